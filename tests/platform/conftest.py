"""Fixtures for the platform tests: toy showers on small meshes and tiny (debug) models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_models import SMALL_MESH, toy_showers

from caloforge.platform.conditioning import Conditions


@pytest.fixture(autouse=True)
def _torch_threads():
    """Two shared cores: keep torch to one intra-op thread for stable, fast tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def small_data() -> tuple[np.ndarray, Conditions]:
    return toy_showers(32, SMALL_MESH, seed=3)
