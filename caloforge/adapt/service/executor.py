"""``Executor``: runs the service's queued adaptation jobs as Ray jobs and keeps the job store in step.

A background thread (started by the app's lifespan or ``caloforge serve``) polls every
``config.poll_interval_s`` seconds:

- **follow** every ``running`` / ``cancelling`` job: copy its new events (the job dir's ``events.jsonl``, or
  the ``CALOFORGE_EVENT`` lines of its Ray logs when no file system is shared) into the store — each with
  ``data.job_seq``, the entrypoint's own ``seq``, so a copy is never made twice, even across restarts —,
  set ``job.stage`` from stage events, and record the outcome when Ray says the job ended: ``SUCCEEDED`` →
  ``succeeded`` with ``result.json``; ``STOPPED`` or ``FAILED`` after a cancel → ``cancelled``; ``FAILED`` →
  ``failed`` with the entrypoint's error event (or Ray's message);
- **submit** queued jobs in queue order while fewer than ``config.max_concurrent`` run: write ``spec.json``
  into the job dir, ``queued → running`` (the store counts the attempt), then ``RayJobRunner.submit``.

:meth:`Executor.reconcile` (run by :meth:`start`, so after every restart) asks Ray about every unfinished
job: still running → followed; ended → its outcome recorded; unknown to Ray → requeued when nothing of it
ran (no events), else ``failed`` naming the reason. The entrypoint registers idempotently by job id, so a
job that runs again never registers a second version.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from caloforge import paths
from caloforge.adapt.service.jobmain import EVENTS_FILE, RESULT_FILE, SPEC_FILE, parse_event_line, read_events

__all__ = ["Executor"]

log = logging.getLogger("caloforge.service.executor")

FOLLOWED = ("running", "cancelling")
RAY_ACTIVE = ("PENDING", "RUNNING")
RAY_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
STAGES = ("adapt", "distill", "evaluate", "export", "register")


class Executor:
    """Runs queued jobs on a ``RayJobRunner`` and records their events and outcomes in a ``JobStore``.

    ``config``: the ``ServiceConfig`` (``max_concurrent``, ``poll_interval_s``, ``job_dir(job_id)``)."""

    def __init__(self, store: Any, runner: Any, config: Any) -> None:
        self.store = store
        self.runner = runner
        self.config = config
        self.max_concurrent = int(config.max_concurrent)
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {config.max_concurrent}")
        self.poll_interval_s = float(config.poll_interval_s)
        self._copied: dict[str, int] = {}  # job id -> the last entrypoint seq copied into the store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one poll at a time (the thread, tests, cancel)
        self.last_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Reconcile with Ray, then poll in a daemon thread until :meth:`stop`."""
        if self.alive():
            return
        self.reconcile()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="caloforge-executor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop polling (running Ray jobs go on; the next start follows them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
                self.last_error = None
            except Exception as exc:  # a database or Ray hiccup must not end the service's executor
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("executor poll failed (retrying in %.1f s)", self.poll_interval_s)

    # -- the work ------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """One round: follow the running jobs, then submit queued ones while there is room."""
        with self._lock:
            for job in self.store.jobs_in(FOLLOWED):
                self._follow(job, self.runner.status(job.id))
            active = len(self.store.jobs_in(FOLLOWED))
            for job in self.store.jobs_in(("queued",)):
                if active >= self.max_concurrent:
                    break
                if self._submit(job):
                    active += 1

    def reconcile(self) -> None:
        """After a (re)start: every unfinished job against Ray (see the module docstring)."""
        with self._lock:
            for job in self.store.jobs_in(FOLLOWED):
                status = self.runner.status(job.id)
                log.info("reconcile %s (%s): Ray says %s", job.id, job.status, status or "unknown")
                self._follow(job, status)

    def cancel(self, job_id: str) -> None:
        """Stop the job's Ray job (the API has set ``cancelling``; the next poll records ``cancelled`` once
        Ray reports it stopped). A job Ray does not know is cancelled at once."""
        with self._lock:
            status = self.runner.status(job_id)
            if status in RAY_ACTIVE:
                self.runner.stop(job_id)
                self.store.add_event(job_id, "log", "stopping the Ray job")
            elif status is None and self.store.transition(job_id, "cancelled", expect=("cancelling",)):
                self.store.add_event(job_id, "log", "cancelled (the job was not running on Ray)")

    def logs(self, job_id: str) -> str:
        """The job's Ray logs ('' when Ray does not know it)."""
        if self.runner.status(job_id) is None:
            return ""
        return self.runner.logs(job_id)

    # -- helpers -------------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        if hasattr(self.config, "job_dir"):
            return Path(self.config.job_dir(job_id))
        return paths.home() / "service" / "jobs" / job_id

    def _submit(self, job: Any) -> bool:
        job_dir = self.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = job_dir / (SPEC_FILE + ".tmp")
        tmp.write_text(json.dumps(job.spec, indent=2, sort_keys=True) + "\n")
        tmp.replace(job_dir / SPEC_FILE)
        started = self.store.transition(job.id, "running", expect=("queued",))
        if started is None:  # cancelled meanwhile
            return False
        try:
            self.runner.submit(job.id, job_dir)
        except Exception as exc:
            self.store.transition(
                job.id, "failed", expect=FOLLOWED, error=f"Ray job submission failed: {exc}"
            )
            self.store.add_event(job.id, "error", f"Ray job submission failed: {exc}")
            raise
        self.store.add_event(job.id, "log", f"submitted as Ray job {job.id} (attempt {started.attempts})")
        log.info("submitted %s (attempt %d)", job.id, started.attempts)
        return True

    def _job_events(self, job_id: str) -> list[dict[str, Any]]:
        """The entrypoint's events: the job dir's file, else the event lines of the Ray logs."""
        path = self.job_dir(job_id) / EVENTS_FILE
        if path.is_file():
            return read_events(path)
        if self.runner.status(job_id) is None:
            return []
        events = [parse_event_line(line) for line in self.runner.logs(job_id).splitlines()]
        return sorted((e for e in events if e is not None), key=lambda e: e["seq"])

    def _copy_events(self, job_id: str) -> list[dict[str, Any]]:
        """Copy the entrypoint's new events into the store (idempotent by the entrypoint's seq)."""
        if job_id not in self._copied:
            seqs = [int((e.data or {}).get("job_seq", 0)) for e in self.store.events(job_id)]
            self._copied[job_id] = max(seqs, default=0)
        events = self._job_events(job_id)
        for event in events:
            if event["seq"] <= self._copied[job_id]:
                continue
            data = {**(event.get("data") or {}), "job_seq": event["seq"]}
            stage = event.get("stage") if event.get("stage") in STAGES else None
            self.store.add_event(job_id, event["kind"], event["message"], data, stage=stage)
            if event["kind"] == "stage" and stage is not None and data.get("phase") == "start":
                self.store.set_stage(job_id, stage)
            self._copied[job_id] = event["seq"]
        return events

    def _follow(self, job: Any, ray_status: str | None) -> None:
        events = self._copy_events(job.id)
        if ray_status in RAY_ACTIVE:
            return
        cancelled = job.status == "cancelling" or job.cancel_requested
        if ray_status is None:
            if cancelled:
                self._end(job, "cancelled", "cancelled (Ray does not know the job)")
            elif not events:
                if self.store.transition(job.id, "queued", expect=("running",)) is not None:
                    self.store.add_event(
                        job.id, "log", "requeued: Ray does not know the job and nothing of it ran"
                    )
                    log.info("requeued %s (unknown to Ray, nothing ran)", job.id)
            else:
                stage = next((e["stage"] for e in reversed(events) if e.get("stage")), None)
                self._end(
                    job,
                    "failed",
                    f"the Ray job is gone (the cluster restarted or lost it) after it had started"
                    f"{f' (stage {stage})' if stage else ''}",
                )
            return
        if ray_status == "SUCCEEDED":
            result = self._result(job.id, events)
            if result is None:
                self._end(job, "failed", "the Ray job succeeded but left no result.json")
            else:
                done = self.store.transition(job.id, "succeeded", expect=FOLLOWED, result=result)
                if done is not None:
                    log.info("%s succeeded: %s", job.id, result.get("uri"))
            return
        if cancelled:
            self._end(job, "cancelled", f"cancelled (Ray job {ray_status})")
            return
        errors = [e["message"] for e in events if e["kind"] == "error"]
        reason = errors[-1] if errors else self._ray_message(job.id, ray_status)
        self._end(job, "failed", reason)

    def _end(self, job: Any, status: str, reason: str) -> None:
        error = None if status == "cancelled" else reason
        if self.store.transition(job.id, status, expect=FOLLOWED, error=error) is not None:
            self.store.add_event(job.id, "error" if status == "failed" else "log", reason)
            log.info("%s %s: %s", job.id, status, reason)

    def _result(self, job_id: str, events: list[dict[str, Any]]) -> dict[str, Any] | None:
        path = self.job_dir(job_id) / RESULT_FILE
        if path.is_file():
            return dict(json.loads(path.read_text()))
        results = [e["data"] for e in events if e["kind"] == "result"]
        return dict(results[-1]) if results else None

    def _ray_message(self, job_id: str, ray_status: str) -> str:
        info = self.runner.info(job_id) if hasattr(self.runner, "info") else None
        message = (info or {}).get("message") or ""
        return f"Ray job {ray_status}" + (f": {message}" if message else "")
