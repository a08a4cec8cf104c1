"""``EmbeddedService``: the whole adaptation service inside this process, for one program's own use
(``caloforge quickstart`` requests its adaptation through it).

The same pieces as ``caloforge serve``: the app (uvicorn in a thread, on 127.0.0.1 and a free port), a SQLite
job store, the executor and a Ray head it owns (``RayJobRunner``; ``num_cpus`` defaults to the machine's
CPUs) — all state under ``home/service/`` (``service.db``, ``jobs/``, ``ray-head.json``, ``ray-head.log``) —
and a token with the ``submit`` and ``read`` scopes made through the token store (``token``)::

    with EmbeddedService(home, data_roots=(data,), configs_dir=configs) as service:
        with AdaptationClient(service.url, service.token) as client:
            job = client.wait(client.submit(request)["id"])

Leaving the ``with`` block (also on an error) stops the server and the executor, then the Ray head and
its jobs: nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from caloforge.environment import free_port

__all__ = ["EmbeddedService"]


class EmbeddedService:
    """The adaptation service in this process (module docstring). ``start()`` / ``close()``, or ``with``."""

    def __init__(
        self,
        home: Path,
        *,
        data_roots: Iterable[Path],
        configs_dir: Path,
        token_name: str = "embedded",
        num_cpus: int | None = None,
        onnx_exporter: str = "dynamo",
        max_concurrent: int = 1,
        poll_interval_s: float = 0.5,
        start_timeout_s: float = 180.0,
    ) -> None:
        from caloforge.adapt.service.config import ServiceConfig

        self.home = Path(home).resolve()
        state = self.home / "service"
        self.num_cpus = int(num_cpus if num_cpus is not None else (os.cpu_count() or 1))
        self.config = ServiceConfig(
            host="127.0.0.1",
            port=free_port(),
            database_url=f"sqlite:///{state / 'service.db'}",
            max_concurrent=max_concurrent,
            data_roots=tuple(Path(r) for r in data_roots),
            configs_dir=Path(configs_dir),
            poll_interval_s=poll_interval_s,
            execute=True,
            jobs_dir=state / "jobs",
            ray_num_cpus=self.num_cpus,
            onnx_exporter=onnx_exporter,
        )
        self.url = f"http://127.0.0.1:{self.config.port}"
        self.token_name = token_name
        self.start_timeout_s = start_timeout_s
        self.token: str | None = None
        self.runner: Any = None
        self._stack = contextlib.ExitStack()

    def start(self) -> EmbeddedService:
        """Open the store, make the token, start the Ray head, the executor and the server; on a failure
        whatever had started is stopped again before the error propagates."""
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        import uvicorn

        from caloforge.adapt.service.app import create_app
        from caloforge.adapt.service.auth import TokenStore
        from caloforge.adapt.service.executor import Executor
        from caloforge.adapt.service.rayjobs import RayJobRunner
        from caloforge.adapt.service.store import JobStore

        store = JobStore(self.config.resolved_database_url())
        self._stack.callback(store.close)
        self.token = TokenStore(store).create(self.token_name, ["submit", "read"])
        self.runner = RayJobRunner(None, self.home, num_cpus=self.config.ray_num_cpus)
        self._stack.callback(self.runner.close, shutdown_head=True)
        executor = Executor(store, self.runner, self.config)
        self._stack.callback(executor.stop)  # a no-op when the server's shutdown has stopped it
        app = create_app(self.config, store=store, executor=executor)
        server = uvicorn.Server(
            uvicorn.Config(app, host=self.config.host, port=self.config.port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, name="caloforge-embedded-service", daemon=True)
        thread.start()
        self._stack.callback(self._stop_server, server, thread)
        deadline = time.monotonic() + self.start_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the embedded adaptation service did not start on {self.url}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the embedded adaptation service did not start within {self.start_timeout_s} s"
                )
            time.sleep(0.05)

    @staticmethod
    def _stop_server(server: Any, thread: threading.Thread) -> None:
        server.should_exit = True
        thread.join(60)
        if thread.is_alive():
            raise RuntimeError("the embedded adaptation service did not stop within 60 s")

    def close(self) -> None:
        """Stop the server (and with it the executor), the Ray head and its jobs; close the store."""
        self._stack.close()

    @staticmethod
    def stop_leftovers(home: Path) -> bool:
        """Stop the Ray head recorded under ``home`` (left by a process that was killed before it could
        close its service): ``rayjobs.stop_recorded_head``."""
        from caloforge.adapt.service.rayjobs import stop_recorded_head

        return stop_recorded_head(home)

    def __enter__(self) -> EmbeddedService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
