"""``ServiceConfig``: the service's settings (``configs/service/local.yaml``) + environment overrides.

Environment overrides (applied after the YAML): ``CALOFORGE_SERVICE_DATABASE_URL`` → ``database_url``,
``RAY_ADDRESS`` → ``ray_address``. ``CALOFORGE_SERVICE_BOOTSTRAP_TOKEN`` (read by the app, never stored in
the config) becomes an ``admin`` token named ``bootstrap``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from caloforge import paths
from caloforge.config import load_config

__all__ = ["ENV_BOOTSTRAP_TOKEN", "ENV_DATABASE_URL", "ServiceConfig", "load_service_config"]

ENV_DATABASE_URL = "CALOFORGE_SERVICE_DATABASE_URL"
ENV_BOOTSTRAP_TOKEN = "CALOFORGE_SERVICE_BOOTSTRAP_TOKEN"
ENV_RAY_ADDRESS = "RAY_ADDRESS"
ONNX_EXPORTERS = ("dynamo", "legacy")  # caloforge.registry.export.EXPORTERS (not imported: torch)


def service_dir() -> Path:
    """``$CALOFORGE_HOME/service``: the database, the job directories, caches."""
    return paths.home() / "service"


@dataclass(frozen=True)
class ServiceConfig:
    """``caloforge serve`` (see docs/service.md).

    ``database_url``: SQLAlchemy URL (``None``: SQLite in WAL mode at ``$CALOFORGE_HOME/service/service.db``;
    ``postgresql+psycopg://...`` for PostgreSQL). ``ray_address``: the Ray cluster jobs are submitted to
    (``None``: a local head the service starts and owns). ``data_roots``: the only directories a request's
    data (and a bundle-directory base) may come from (``None``: ``$CALOFORGE_HOME/data`` and ``./data``).
    ``configs_dir``: where ``adapt/<strategy>.yaml`` and ``distill/<method>.yaml`` are read. ``execute``:
    ``False`` validates and queues jobs without running them (validate-only mode, ``--no-execute``).
    ``ray_num_cpus``: the CPUs of the owned local Ray head (unused with ``ray_address``). ``onnx_exporter``:
    the torch.onnx exporter of the jobs' export stage (``dynamo``, as ``caloforge export``; ``legacy``: the
    TorchScript exporter, much faster on small graphs), recorded in each job's spec.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = None
    ray_address: str | None = None
    max_concurrent: int = 1
    data_roots: tuple[Path, ...] | None = None
    configs_dir: Path = Path("configs")
    max_body_bytes: int = 1024 * 1024
    max_detector_yaml_bytes: int = 64 * 1024
    poll_interval_s: float = 1.0
    execute: bool = True
    base_cache_ttl_s: float = 30.0
    page_limit_max: int = 200
    jobs_dir: Path | None = None
    ray_num_cpus: int = 2
    onnx_exporter: str = "dynamo"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not 0 < self.max_detector_yaml_bytes <= self.max_body_bytes:
            raise ValueError(
                f"max_detector_yaml_bytes must be in (0, max_body_bytes={self.max_body_bytes}], got "
                f"{self.max_detector_yaml_bytes}"
            )
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")
        if self.base_cache_ttl_s < 0:
            raise ValueError(f"base_cache_ttl_s must be >= 0, got {self.base_cache_ttl_s}")
        if self.page_limit_max < 1:
            raise ValueError(f"page_limit_max must be >= 1, got {self.page_limit_max}")
        if self.ray_num_cpus < 1:
            raise ValueError(f"ray_num_cpus must be >= 1, got {self.ray_num_cpus}")
        if self.onnx_exporter not in ONNX_EXPORTERS:
            raise ValueError(
                f"onnx_exporter must be one of {list(ONNX_EXPORTERS)}, got {self.onnx_exporter!r}"
            )
        if self.data_roots is not None and not self.data_roots:
            raise ValueError("data_roots must name at least one directory (or be null for the defaults)")

    # -- resolved values (the environment at call time: CALOFORGE_HOME may differ between tests) ----------
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        db = service_dir() / "service.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"

    def resolved_data_roots(self) -> tuple[Path, ...]:
        roots = self.data_roots if self.data_roots is not None else (paths.data_dir(), Path("data"))
        return tuple(Path(r).expanduser().resolve() for r in roots)

    def resolved_jobs_dir(self) -> Path:
        return (Path(self.jobs_dir) if self.jobs_dir is not None else service_dir() / "jobs").resolve()

    def job_dir(self, job_id: str) -> Path:
        return self.resolved_jobs_dir() / job_id

    def cache_dir(self) -> Path:
        return service_dir() / "cache"

    def with_env(self, env: Mapping[str, str] | None = None) -> ServiceConfig:
        """This config with the environment overrides applied."""
        env = os.environ if env is None else env
        changes: dict[str, object] = {}
        if env.get(ENV_DATABASE_URL):
            changes["database_url"] = env[ENV_DATABASE_URL]
        if env.get(ENV_RAY_ADDRESS):
            changes["ray_address"] = env[ENV_RAY_ADDRESS]
        return dataclasses.replace(self, **changes) if changes else self


def load_service_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> ServiceConfig:
    """The YAML (defaults when ``path`` is None) + ``--set`` overrides + the environment overrides."""
    return load_config(ServiceConfig, path, overrides).with_env(env)
