"""Helpers of the service tests (a module of its own: ``conftest`` is not importable unambiguously): a tiny
base model, simulated shard sets, a uvicorn server in a thread on a free 127.0.0.1 port, an HTTP client."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from tiny_world import BASE_DETECTORS, MODEL, make_shards

from caloforge.datasets.shards import Manifest
from caloforge.environment import free_port
from caloforge.platform.lineage import Lineage
from caloforge.training.job import model_for_manifest


def make_base_bundle(root: Path) -> Path:
    """An untrained base on par04-siw and pbwo4 with one spare detector slot (seeded)."""
    shards = make_shards(root / "base-data", BASE_DETECTORS, 40)
    torch.manual_seed(0)
    model = model_for_manifest(MODEL, Manifest.load(shards), spare_detector_slots=1)
    return model.save(root / "bundle", lineage=Lineage(kind="base", objective="flow_matching"))


class ThreadServer:
    """A real uvicorn server on 127.0.0.1 in a thread (``url``; ``stop()``)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def request_body(service: Any, **changes: Any) -> dict[str, Any]:
    """A valid submission: the base bundle, lar-pb, the service's shard set, a tiny run."""
    body: dict[str, Any] = {
        "base": str(service.base_bundle),
        "detector": {"name": "lar-pb"},
        "data": str(service.data),
        "strategy": "full",
        "hyperparameters": {"loop.steps": 4, "eval.n_showers": 20},
        "seed": 1,
        "metadata": {"requested_by": "tests"},
    }
    body.update(changes)
    return body
