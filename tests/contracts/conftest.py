"""Fixtures for the contract tests; the toy factory lives in tests/platform/toy_models.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


@pytest.fixture(autouse=True)
def _torch_threads():
    """Two shared cores: keep torch to one intra-op thread for stable, fast tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
