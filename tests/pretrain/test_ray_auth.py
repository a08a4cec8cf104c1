"""Drill 10 (issue 15): the embedded Ray runs with token authentication, set explicitly; with
``RAY_AUTH_MODE=disabled`` in the environment it refuses to start unless the user opts out by name.
(That the embedded Ray of the slow tests really runs in token mode is asserted by the ``ray_local``
fixture.)"""

from __future__ import annotations

import logging
import os

import pytest

from caloforge.pretrain.launch import ALLOW_UNAUTHENTICATED_ENV, embedded_auth_mode, ray_session


def test_embedded_ray_with_auth_disabled_in_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session of another test is running in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(ALLOW_UNAUTHENTICATED_ENV, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with (
        pytest.raises(ValueError, match=r"RAY_AUTH_MODE=disabled .*cluster\.allow_unauthenticated_ray=true"),
        ray_session(num_cpus=1),
    ):
        pass
    assert not ray.is_initialized()  # refused before anything started

    with caplog.at_level(logging.WARNING, logger="caloforge.pretrain"):
        assert embedded_auth_mode(allow_unauthenticated=True) == "disabled"
        monkeypatch.setenv(ALLOW_UNAUTHENTICATED_ENV, "1")
        assert embedded_auth_mode() == "disabled"
    said = [r.getMessage() for r in caplog.records]
    assert any("WITHOUT authentication" in m and "cluster.allow_unauthenticated_ray" in m for m in said)
    assert any(ALLOW_UNAUTHENTICATED_ENV in m for m in said)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # an opt-out leaves the user's setting alone
