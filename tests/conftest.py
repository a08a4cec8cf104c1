"""Shared test setup: quiet, local defaults and the gpu marker."""

from __future__ import annotations

import os

import pytest

from caloforge.environment import apply_default_env

apply_default_env()
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
