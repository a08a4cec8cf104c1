"""The run directory of a single-process job (``caloforge train``, ``adapt``, ``distill``): the log file and
process settings for the duration of a run, the recorded request a resume must match, atomic JSON files."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_logging", "start_or_resume", "write_json"]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (a temporary sibling, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def run_logging(run_dir: Path, log_name: str, torch_threads: int = 0) -> Iterator[None]:
    """For the block: the ``caloforge`` log (INFO and up) also goes to ``run_dir/log_name`` (appended on
    resume), and torch uses ``torch_threads`` intra-op threads (0: unchanged); both are restored after."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / log_name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("caloforge")
    root.addHandler(handler)
    previous_level, previous_threads = root.level, torch.get_num_threads()
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        torch.set_num_threads(previous_threads)
        handler.close()


def start_or_resume(run_dir: Path, record: dict[str, Any], resume: bool, what: str) -> str:
    """The run id of ``run_dir``: a new run records ``record`` (and a fresh id) in ``request.json`` and needs
    a directory without one; a resumed run (``resume``) must have been started with the same ``record``."""
    path = run_dir / "request.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if not resume:
            raise ValueError(
                f"{run_dir} holds {what} run already: pass --resume, or choose another --run-dir"
            )
        if {k: previous.get(k) for k in record} != record:
            diff = sorted(k for k in record if previous.get(k) != record[k])
            raise ValueError(f"{run_dir}: --resume with another request or config (differs in {diff})")
        return str(previous["run_id"])
    if resume:
        raise ValueError(f"--resume: {run_dir} holds no {what} run")
    run_id = uuid.uuid4().hex
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {**record, "run_id": run_id})
    return run_id
