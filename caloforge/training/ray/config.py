"""The Ray Train blocks of a job config, shared by pretraining (``PretrainConfig``) and adaptation
(``AdaptConfig``): ``engine`` (DeepSpeed ZeRO stage or plain DDP) and ``cluster`` (Ray Train scaling,
storage, failure/checkpoint policy). Same keys, same checks, same error messages in both jobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ClusterConfig", "DeepSpeedOptions", "EngineConfig"]


@dataclass(frozen=True)
class DeepSpeedOptions:
    """ZeRO knobs; the DeepSpeed JSON is generated from these plus ``loop`` (``deepspeed_config``)."""

    zero_stage: int = 2  # 0: plain data parallel; 1: shard optimizer states; 2: + shard gradients
    overlap_comm: bool = False  # overlap gradient reduction with backward (pays off on GPUs)
    # ZeRO-2 gradient reduction: reduce each slice to the rank that owns it (True), or all-reduce whole
    # buckets and keep the own partition (False: fewer, larger collectives; faster over gloo on CPU)
    reduce_scatter: bool = True
    # copy gradients into one contiguous buffer as they are produced (less memory fragmentation)
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce bucket
    allgather_bucket_size: int = 50_000_000  # elements per parameter all-gather bucket

    def __post_init__(self) -> None:
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2):
            raise ValueError(
                f"engine.deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage!r} (stage 3 would "
                "shard the parameters themselves, which the EMA and the final bundle need whole)"
            )
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.deepspeed.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineConfig:
    """Which distributed engine drives the loop: DeepSpeed (ZeRO) or plain torch DDP."""

    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    deepspeed: DeepSpeedOptions = DeepSpeedOptions()
    find_unused_parameters: bool = False  # DDP only


@dataclass(frozen=True)
class ClusterConfig:
    """Ray Train scaling and run policy.

    ``storage_path``: where runs live (``<storage_path>/<run name>``): a local directory or any pyarrow
    filesystem URI (``s3://bucket/runs``, ``gs://…``) on clusters. Default: pretraining
    ``$CALOFORGE_HOME/runs``; adaptation the run directory itself (Ray's checkpoints beside its files).
    ``local_num_cpus``: CPUs of the embedded local Ray started when ``RAY_ADDRESS`` is unset (default:
    ``ceil(num_workers × cpus_per_worker)``).
    """

    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    storage_path: str | None = None
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    num_to_keep: int = 2  # checkpoints kept in storage (older ones are deleted)
    local_num_cpus: int | None = None
    # The embedded local Ray is started with token authentication (RAY_AUTH_MODE=token). With
    # RAY_AUTH_MODE=disabled in the environment it refuses to start unless this is true (or
    # CALOFORGE_ALLOW_UNAUTHENTICATED_RAY=1 is set): say by name that an unauthenticated Ray is meant.
    allow_unauthenticated_ray: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"cluster.num_workers must be >= 1, got {self.num_workers}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cluster.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ValueError(f"cluster.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"cluster.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.num_to_keep < 1:
            raise ValueError(f"cluster.num_to_keep must be >= 1, got {self.num_to_keep}")
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise ValueError(f"cluster.local_num_cpus must be >= 1, got {self.local_num_cpus}")
