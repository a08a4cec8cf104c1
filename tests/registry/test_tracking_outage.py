"""MLflow outage during training (issue 15): ``BestEffortTracker`` queues and replays, never blocks for long,
and "cannot connect" is never reported as "run not found". The unreachable server is a real closed port on
127.0.0.1; the server "coming back" is the run's real sqlite store."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from caloforge.environment import free_port
from caloforge.registry.tracking import BestEffortTracker, RunTracker, TrackingUnavailable, short_timeouts


@pytest.fixture
def sqlite_uri(tmp_path: Path, empty_mlflow_db: Path) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_mlflow_db, db)
    return f"sqlite:///{db}"


def test_unreachable_server_is_not_reported_as_run_not_found(sqlite_uri: str) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with short_timeouts(2), pytest.raises(TrackingUnavailable, match=f"cannot reach .*{down}"):
        RunTracker("exp", run_id="0123456789abcdef", tracking_uri=down)
    assert time.perf_counter() - t0 < 5  # not MLflow's minutes of retries
    with pytest.raises(ValueError, match="not found"):
        RunTracker("exp", run_id="0123456789abcdef", tracking_uri=sqlite_uri)


def test_metrics_queued_during_an_outage_are_replayed_in_order(sqlite_uri: str) -> None:
    run_id = RunTracker("exp", run_name="r", tracking_uri=sqlite_uri).run_id
    now = [0.0]
    tracker = BestEffortTracker(
        "exp", run_id, f"http://127.0.0.1:{free_port()}", timeout_s=1, retry_every_s=30, clock=lambda: now[0]
    )
    t0 = time.perf_counter()
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step}, step)
        now[0] += 1
    assert time.perf_counter() - t0 < 5
    assert len(tracker.pending) == 3 and tracker.failures == 1  # one attempt, then the retry interval
    assert not tracker.available and not tracker.flush() and tracker.failures == 2
    record = tracker.pending_record()
    assert [r["step"] for r in record["metrics"]] == [1, 2, 3]

    tracker.tracking_uri = sqlite_uri  # the store is back
    now[0] += 30
    tracker.log_metrics({"loss": 0.2}, 4)
    assert tracker.available and not tracker.pending and tracker.replayed == 4
    history = RunTracker("exp", run_id=run_id, tracking_uri=sqlite_uri).client.get_metric_history(
        run_id, "loss"
    )
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.2)]
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps)  # original timestamps kept
