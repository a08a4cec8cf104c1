"""``benchmarks/service.py --quick`` end to end: a real ``caloforge serve --no-execute`` subprocess on
127.0.0.1, 20 concurrent submissions racing 2 duplicates of their keys, then the GETs; the JSON it writes
counts no lost and no duplicated job, every answer a 202 / 200, finite latencies."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_service_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("CALOFORGE_SERVICE_BOOTSTRAP_TOKEN", None)
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "service.py"),
        "--quick",
        "--work-dir",
        str(tmp_path / "w"),
    ]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    v = record["validate_only"]
    assert record["lost"] == 0 and record["duplicated"] == 0 and "executing" not in record
    assert v["submissions"] == 20 and v["duplicate_requests"] == 2 and v["replayed_answers"] == 2
    assert v["post"]["status_codes"] == {"202": 22} and v["get"]["status_codes"] == {"200": 22}
    checks = v["checks"]
    assert checks["accepted_jobs"] == checks["rows"] == 21  # the warm-up job and one per distinct key
    assert checks["lost_db"] == checks["lost_list"] == checks["unexpected_rows"] == 0
    for name in ("post", "get"):
        for stat in ("p50_ms", "p99_ms", "throughput_per_s"):
            assert math.isfinite(v[name][stat]) and v[name][stat] > 0, (name, stat, v[name])
        assert v[name]["p50_ms"] <= v[name]["p99_ms"] <= v[name]["max_ms"]
    assert "POST" in proc.stdout and "lost 0, duplicated 0" in proc.stdout
