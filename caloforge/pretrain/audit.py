"""Data audit of a pretraining run: fingerprints of the first samples each rank really trained on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.streaming import ShowerStream
from caloforge.pretrain.rundir import RunDir

__all__ = ["AuditedStream", "sample_fingerprint"]


def sample_fingerprint(showers_ZPR: np.ndarray) -> str:
    """Identity of one shower sample (blake2b of its float32 voxels), used by the data audit."""
    return hashlib.blake2b(
        np.ascontiguousarray(showers_ZPR, dtype=np.float32).tobytes(), digest_size=12
    ).hexdigest()


class AuditedStream:
    """Pass-through of a stream that records fingerprints of the first ``n`` samples it yields and writes
    them to ``<run>/audit/step<start>_rank<r>.json`` (which shards each rank really read can be checked)."""

    def __init__(self, stream: ShowerStream, n: int, run: RunDir, rank: int, start_step: int = 0) -> None:
        self.stream, self.n, self.run, self.rank, self.start_step = stream, n, run, rank, start_step
        self.fingerprints: list[str] = []
        self._written = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[ShowerBatch]:
        for batch in self.stream:
            if len(self.fingerprints) < self.n:
                x = batch.showers_BZPR.numpy()
                for i in range(min(len(batch), self.n - len(self.fingerprints))):
                    self.fingerprints.append(sample_fingerprint(x[i]))
                if len(self.fingerprints) >= self.n and not self._written:
                    self.run.write_json(
                        f"audit/step{self.start_step:08d}_rank{self.rank:05d}.json",
                        {"rank": self.rank, "start_step": self.start_step, "fingerprints": self.fingerprints},
                    )
                    self._written = True
            yield batch
