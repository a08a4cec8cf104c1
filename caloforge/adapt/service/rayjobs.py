"""Adaptation jobs as Ray jobs: ``RayJobRunner`` over ``ray.job_submission.JobSubmissionClient``.

- ``address`` given (``RAY_ADDRESS``: the dashboard's ``http://host:8265``, e.g. a KubeRay head service): jobs
  go there; the cluster's authentication is the environment's (``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN``, as
  for ``ray job submit``).
- ``address`` None: a local Ray head that the service owns — ``ray start --head --block`` in a session of its
  own (so it outlives a SIGKILLed service and the jobs on it keep running), every port on 127.0.0.1 and
  chosen free (other Ray clusters on the machine are left alone), its own short temp dir, usage stats off,
  ``num_cpus`` CPUs, token authentication (``caloforge.environment.embedded_auth_mode``:
  ``RAY_AUTH_MODE=token``, the token in ``~/.ray/auth_token`` or ``$RAY_AUTH_TOKEN``;
  ``RAY_AUTH_MODE=disabled`` is refused unless opted out by name). It is recorded in
  ``$CALOFORGE_HOME/service/ray-head.json`` and re-attached by the next ``RayJobRunner`` (a restarted
  service) while it answers; ``close(shutdown_head=True)`` stops it.

The entrypoint is ``python -m caloforge.adapt.service.jobmain --job-id ID --job-dir DIR`` with a runtime env
carrying what the job needs: ``PYTHONPATH`` (this caloforge first), ``CALOFORGE_HOME``,
``MLFLOW_TRACKING_URI`` (the service's store), the telemetry-off variables; on the owned head the job runs
with this interpreter and in the service's working directory (``--cwd``), so relative paths resolve as the
service's do. The submission id is the job id.

This module and ``caloforge.pretrain`` are the places that import ray (tests/foundation/test_layering.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import caloforge
from caloforge import paths
from caloforge.environment import DEFAULT_ENV, embedded_auth_mode, free_ports

__all__ = ["HEAD_FILE", "RayJobRunner", "job_env", "stop_recorded_head"]

log = logging.getLogger("caloforge.service.ray")

HEAD_FILE = "ray-head.json"
ALLOW_SETTING = "RayJobRunner(allow_unauthenticated=True)"
# Passed on to the job when the service has them (the job's own settings for CPU threads and the like).
PASS_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "CALOFORGE_ALLOW_UNAUTHENTICATED_RAY")


def job_env() -> dict[str, str]:
    """The environment variables a job needs: this caloforge on ``PYTHONPATH``, ``CALOFORGE_HOME``, the
    MLflow store the service uses, telemetry off."""
    root = str(Path(caloforge.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(
        dict.fromkeys([root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    )
    env = {
        **DEFAULT_ENV,
        **{k: os.environ[k] for k in DEFAULT_ENV if k in os.environ},
        "PYTHONPATH": pythonpath,
        "CALOFORGE_HOME": str(paths.home()),
        "MLFLOW_TRACKING_URI": paths.mlflow_tracking_uri(),
    }
    env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
    return env


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class RayJobRunner:
    """Submit, follow, stop adaptation jobs as Ray jobs (see the module docstring)."""

    def __init__(
        self,
        address: str | None,
        home: Path | None = None,
        *,
        num_cpus: int = 2,
        start_timeout_s: float = 180.0,
        allow_unauthenticated: bool = False,
    ) -> None:
        """``address``: the Ray dashboard URL (``http://host:8265``) or None for the owned local head;
        ``home``: ``$CALOFORGE_HOME`` (where ``service/ray-head.json`` lives; default ``paths.home()``);
        ``num_cpus``: the owned head's CPUs (when it starts one)."""
        self.home = Path(home) if home is not None else paths.home()
        self.state_dir = self.home / "service"
        self.head_file = self.state_dir / HEAD_FILE
        self.num_cpus = int(num_cpus)
        self.owned = address is None
        self.head: dict[str, Any] | None = None
        if self.owned:
            if self.num_cpus < 1:
                raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
            embedded_auth_mode(allow_unauthenticated, ALLOW_SETTING)
            self.head = self._attach_or_start(start_timeout_s)
            self.address = str(self.head["dashboard_url"])
        else:
            self.address = str(address)
        self.client = self._connect(self.address)

    def __repr__(self) -> str:
        return f"RayJobRunner({self.address!r}, owned={self.owned})"

    # -- the owned head ------------------------------------------------------------------------------------
    @staticmethod
    def _connect(address: str, timeout_s: float = 0.0) -> Any:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return JobSubmissionClient(address)
            except (ConnectionError, RuntimeError) as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"Ray job server at {address}: {exc}") from exc
                time.sleep(1.0)

    def _attach_or_start(self, timeout_s: float) -> dict[str, Any]:
        if self.head_file.is_file():
            head = json.loads(self.head_file.read_text())
            if _pid_alive(int(head.get("pid", -1))):
                try:
                    self._connect(head["dashboard_url"], timeout_s=min(timeout_s, 60.0))
                except ConnectionError as exc:
                    log.warning("the recorded Ray head (pid %s) does not answer: %s", head.get("pid"), exc)
                else:
                    log.info(
                        "re-attached to the service's Ray head %s (pid %s)",
                        head["dashboard_url"],
                        head["pid"],
                    )
                    return head
            self._stop_head(head)
        return self._start_head(timeout_s)

    def _start_head(self, timeout_s: float) -> dict[str, Any]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Ray's unix socket paths must stay short: a temp dir of its own under /tmp, not under the home.
        temp_dir = tempfile.mkdtemp(prefix="cfsvc-ray-", dir="/tmp")
        names = (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(DEFAULT_ENV | {k: os.environ[k] for k in DEFAULT_ENV if k in os.environ})
        logfile = self.state_dir / "ray-head.log"
        with logfile.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the service's process group: survives its death
            )
        head = {
            "pid": proc.pid,
            "dashboard_url": f"http://127.0.0.1:{ports['dashboard-port']}",
            "gcs_address": f"127.0.0.1:{ports['port']}",
            "temp_dir": temp_dir,
            "num_cpus": self.num_cpus,
            "auth_mode": os.environ.get("RAY_AUTH_MODE"),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "log": str(logfile),
        }
        tmp = self.head_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(head, indent=2) + "\n")
        tmp.replace(self.head_file)
        log.info(
            "starting the service's Ray head (%d CPUs, 127.0.0.1, dashboard %s, %s auth; log %s)",
            self.num_cpus,
            head["dashboard_url"],
            head["auth_mode"],
            logfile,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"`ray start --head` exited with {proc.returncode}: {logfile.read_text()[-3000:]}"
                )
            try:
                self._connect(head["dashboard_url"])
                return head
            except ConnectionError as exc:
                if time.monotonic() > deadline:
                    self._stop_head(head)
                    raise RuntimeError(
                        f"the service's Ray head did not answer within {timeout_s:.0f} s ({exc}); "
                        f"log: {logfile}"
                    ) from exc
            time.sleep(1.0)

    @staticmethod
    def _stop_head(head: dict[str, Any], grace_s: float = 8.0) -> None:
        """Stop a head started by ``_start_head``: SIGTERM to ``ray start --block`` alone (it stops what it
        started: 3 s here; a SIGTERM to every Ray process at once left them waiting on each other past the
        grace time), then whatever is left of it (processes whose command line names its own temp dir):
        SIGTERM, then SIGKILL."""
        import psutil

        temp_dir = str(head.get("temp_dir") or "")
        others = []
        pid = int(head.get("pid", -1))
        if temp_dir.startswith("/tmp/cfsvc-ray-"):
            for proc in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    if proc.pid not in (os.getpid(), pid) and any(
                        temp_dir in part for part in proc.info["cmdline"] or []
                    ):
                        others.append(proc)
        alive = others
        if _pid_alive(pid):
            ray_start = psutil.Process(pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                ray_start.terminate()
            _, alive = psutil.wait_procs([ray_start, *others], timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=2)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        if temp_dir.startswith("/tmp/cfsvc-ray-"):
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)

    # -- jobs ----------------------------------------------------------------------------------------------
    def entrypoint(self, job_id: str, job_dir: Path) -> str:
        python = sys.executable if self.owned else "python"
        args = [
            python,
            "-m",
            "caloforge.adapt.service.jobmain",
            "--job-id",
            job_id,
            "--job-dir",
            str(job_dir),
        ]
        if self.owned:
            args += ["--cwd", os.getcwd()]
        return shlex.join(args)

    def submit(self, job_id: str, job_dir: Path) -> None:
        """Submit the job (submission id = ``job_id``); a submission id Ray knows already is not an error (a
        restarted service re-submitting the job it had submitted)."""
        if self.status(job_id) is not None:
            log.info("Ray knows job %s already (not submitted again)", job_id)
            return
        try:
            self.client.submit_job(
                entrypoint=self.entrypoint(job_id, Path(job_dir).resolve()),
                submission_id=job_id,
                runtime_env={"env_vars": job_env()},
                metadata={"caloforge.service_job": job_id},
            )
        except RuntimeError:
            if self.status(job_id) is None:
                raise
            log.info("Ray knows job %s already (submitted concurrently)", job_id)

    def status(self, job_id: str) -> str | None:
        """Ray's status name (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED) or None when Ray does not know
        the job (another errors are raised)."""
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as exc:
            if "status code 404" in str(exc) or "does not exist" in str(exc):
                return None
            raise
        return str(getattr(info.status, "value", info.status))

    def info(self, job_id: str) -> dict[str, Any] | None:
        """Ray's record of the job (status, message, start/end times) or None when unknown."""
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as exc:
            if "status code 404" in str(exc) or "does not exist" in str(exc):
                return None
            raise
        return {
            "status": str(getattr(info.status, "value", info.status)),
            "message": info.message,
            "start_time": info.start_time,
            "end_time": info.end_time,
        }

    def stop(self, job_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace time); True if it was running."""
        return bool(self.client.stop_job(job_id))

    def logs(self, job_id: str) -> str:
        return str(self.client.get_job_logs(job_id))

    def close(self, shutdown_head: bool = False) -> None:
        """Forget the client; with ``shutdown_head`` also stop the owned head (and its jobs) and forget it."""
        if shutdown_head and self.owned and self.head is not None:
            self._stop_head(self.head)
            with contextlib.suppress(FileNotFoundError):
                self.head_file.unlink()
            self.head = None


def stop_recorded_head(home: Path) -> bool:
    """Stop the service's own Ray head recorded in ``home/service/ray-head.json`` (it outlives the service
    on purpose, so that a restarted service follows its jobs) and remove the record; False when there is
    none. ``caloforge serve stop-head``; also what cleans up after a killed quickstart."""
    path = Path(home) / "service" / HEAD_FILE
    if not path.is_file():
        return False
    RayJobRunner._stop_head(json.loads(path.read_text()))
    path.unlink()
    return True
