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


_EXIT_STATUS = pytest.StashKey[int]()


# `make test` once ended "910 passed" and then "Segmentation fault" from the interpreter's own teardown
# (after pytest had finished and printed its summary; faulthandler was already off, so no stack). With
# CALOFORGE_PYTEST_HARD_EXIT=1 (set by the Makefile's test targets) the run ends right after pytest is done:
# the atexit handlers run (Ray's shutdown, MLflow's), then os._exit with pytest's exit status, skipping only
# the finalisation of modules and native libraries where that crash happened. Ad-hoc pytest runs are as
# before.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get("CALOFORGE_PYTEST_HARD_EXIT") != "1" or _EXIT_STATUS not in config.stash:
        return
    import atexit
    import sys

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_EXIT_STATUS])
