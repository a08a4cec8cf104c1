"""The job entrypoint run directly (no Ray): stages with events, result.json, one registered version with
the job tag and an ONNX export; a second run of the same job registers nothing new; errors are events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_exec_helpers import write_spec

from caloforge.adapt.service.jobmain import JOB_TAG, main, parse_event_line, read_events
from caloforge.platform.geometry import DETECTORS_DIR


def _stage_events(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["stage"], e["data"]["phase"]) for e in events if e["kind"] == "stage"]


@pytest.mark.slow
def test_entrypoint_runs_the_stages_registers_once_and_a_rerun_registers_nothing_new(
    service_home: Path, tiny_assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from caloforge.registry.store import RegistryStore

    job_dir = service_home / "service" / "jobs" / "adapt-direct"
    inline = (DETECTORS_DIR / "lar-pb.yaml").read_text()
    write_spec(job_dir, data=tiny_assets["data"], config=tiny_assets["config"], detector={"yaml": inline})
    assert main(["--job-id", "adapt-direct", "--job-dir", str(job_dir)]) == 0

    events = read_events(job_dir / "events.jsonl")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert _stage_events(events) == [
        (stage, phase) for stage in ("adapt", "evaluate", "export", "register") for phase in ("start", "end")
    ]
    ends = {e["stage"]: e["data"] for e in events if e["kind"] == "stage" and e["data"]["phase"] == "end"}
    assert ends["adapt"]["steps"] == 4 and ends["adapt"]["seconds"] > 0
    assert {"fpd", "kpd", "auc_high"} <= set(ends["evaluate"]["metrics"])
    assert ends["export"]["adapted"]["max_abs_err_mev"] >= 0
    printed = [parse_event_line(line) for line in capsys.readouterr().out.splitlines()]
    assert [e for e in printed if e is not None] == events  # the same events reach stdout (Ray's logs)
    assert (job_dir / "detector.yaml").read_text() == inline
    assert (job_dir / "detector" / "lar-pb.yaml").read_text() == inline

    result = json.loads((job_dir / "result.json").read_text())
    assert events[-1]["kind"] == "result" and events[-1]["data"] == result
    assert (result["registered_model"], result["version"], result["alias"]) == (
        "caloforge-lar-pb",
        1,
        "candidate",
    )
    assert result["uri"] == "models:/caloforge-lar-pb/1" and "candidate" in result["aliases"]
    assert result["parent"] == {"uri": "models:/caloforge-base/1", "version": "1"}
    assert Path(result["onnx_uri"]).is_file() and result["onnx_uri"].startswith(str(job_dir / "onnx"))
    assert (Path(result["report_dir"]) / "report.md").is_file() and result["distilled"] is None
    store = RegistryStore()
    (version,) = store.search(tags={JOB_TAG: "adapt-direct"})
    assert version.uri == result["uri"] and version.tags["caloforge.kind"] == "adapted"
    assert float(version.tags["metric.fpd"]) == pytest.approx(result["metrics"]["fpd"])

    # Again (a restarted service or a Ray retry): every stage is reused, nothing new is registered.
    assert main(["--job-id", "adapt-direct", "--job-dir", str(job_dir)]) == 0
    again = read_events(job_dir / "events.jsonl")[len(events) :]
    assert again[0]["seq"] == len(events) + 1
    assert "reused" in next(
        e["message"] for e in again if e["stage"] == "adapt" and e["data"]["phase"] == "end"
    )
    register_end = next(e for e in again if e["stage"] == "register" and e["data"].get("phase") == "end")
    assert register_end["data"]["adapted"]["existing"] is True
    assert [v.uri for v in store.versions("caloforge-lar-pb")] == ["models:/caloforge-lar-pb/1"]
    assert json.loads((job_dir / "result.json").read_text())["uri"] == result["uri"]


def test_a_job_without_spec_fails_with_an_error_event(tmp_path: Path) -> None:
    assert main(["--job-id", "adapt-nospec", "--job-dir", str(tmp_path)]) == 1
    (event,) = read_events(tmp_path / "events.jsonl")
    assert event["kind"] == "error" and event["data"]["type"] == "ValueError"
    assert "spec.json: no job spec" in event["message"] and not (tmp_path / "result.json").exists()


def test_event_lines_parse_only_with_the_prefix() -> None:
    assert parse_event_line('CALOFORGE_EVENT {"seq": 3, "kind": "log"}') == {"seq": 3, "kind": "log"}
    assert parse_event_line('{"seq": 3}') is None and parse_event_line("CALOFORGE_EVENT {torn") is None
