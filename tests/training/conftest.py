"""Training tests run torch on one thread: on the shared 2-core machines a second busy process makes
OpenMP's two-thread kernels ~10× slower (spin-waiting), while one thread stays fast; one thread also
keeps float reductions in one order, so the golden loss curve does not depend on the core count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
