"""Drill 10 (issue 15): the embedded Ray runs with token authentication, set explicitly; with
``RAY_AUTH_MODE=disabled`` in the environment it refuses to start unless the user opts out by name.
(That the embedded Ray of the slow tests really runs in token mode is asserted by the ``ray_local``
fixture.)"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from caloforge.environment import ALLOW_UNAUTHENTICATED_ENV, embedded_auth_mode

REPO = Path(__file__).resolve().parents[2]


_REFUSAL = """
import ray
from caloforge.training.ray.launch import ray_session
try:
    with ray_session(num_cpus=1):
        raise SystemExit("started an unauthenticated Ray")
except ValueError as exc:
    assert not ray.is_initialized(), "Ray started before the refusal"
    print("REFUSED:", exc)
"""


def test_embedded_ray_with_auth_disabled_in_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # In a fresh interpreter: this process may already hold another test's Ray session, which
    # ``ray_session`` would reuse instead of starting (and refusing) an embedded one.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ALLOW_UNAUTHENTICATED_ENV)}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _REFUSAL], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(
        r"REFUSED: .*RAY_AUTH_MODE=disabled .*cluster\.allow_unauthenticated_ray=true", done.stdout
    )

    monkeypatch.delenv(ALLOW_UNAUTHENTICATED_ENV, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with caplog.at_level(logging.WARNING, logger="caloforge.pretrain"):
        assert embedded_auth_mode(allow_unauthenticated=True) == "disabled"
        monkeypatch.setenv(ALLOW_UNAUTHENTICATED_ENV, "1")
        assert embedded_auth_mode() == "disabled"
    said = [r.getMessage() for r in caplog.records]
    assert any("WITHOUT authentication" in m and "cluster.allow_unauthenticated_ray" in m for m in said)
    assert any(ALLOW_UNAUTHENTICATED_ENV in m for m in said)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # an opt-out leaves the user's setting alone
