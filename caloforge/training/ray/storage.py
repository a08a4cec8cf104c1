"""The directory of a Ray Train run, ``<storage_path>/<run name>``, on a local disk or any pyarrow filesystem
(shared by pretraining and adaptation on Ray; ``caloforge.training.ray``).

Ray Train keeps its own state there (``checkpoint_<step>/`` directories, ``checkpoint_manager_snapshot.json``,
``.validate_storage_marker``); the shared worker (``training/ray/worker.py``) adds, next to them:

=============================  ==========================================================================
``attempts/``                  one JSON per worker-group start (rank 0): the step it started from
``fault_injection_fired.json`` marker of the test-only fault injection (it fires once per run)
``metrics.jsonl``              rank 0's log-step metrics (one consistent timeline across restarts)
``logs/``                      ``worker_rank<r>.log`` (and the driver's log)
=============================  ==========================================================================

and each job its own files (pretraining: ``docs/pretraining.md``; adaptation: ``adapt/pipeline.py``).
Local paths are written directly (atomically: temp file + rename); remote URIs (``s3://``, ``gs://``,
``hdfs://``, ...) go through ``pyarrow.fs`` (an object-store PUT is atomic).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from caloforge import paths
from caloforge.training.hooks import Hook

__all__ = [
    "FAULT_MARKER",
    "FaultInjection",
    "RunDir",
    "UploadRunFiles",
    "resolve_storage_path",
    "validate_run_name",
]

FAULT_MARKER = "fault_injection_fired.json"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_FILE_MODE = 0o666 & ~_umask()  # what open() would give (mkstemp creates 0600)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def validate_run_name(name: str) -> str:
    """A run name is a directory name: letters, digits, ``.``, ``_``, ``-`` (starting with a letter/digit)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"run name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def resolve_storage_path(storage_path: str | None) -> str:
    """``None`` → ``$CALOFORGE_HOME/runs``; a local path → absolute; a URI (``s3://…``) unchanged."""
    if storage_path is None or storage_path == "":
        return str(paths.runs_dir())
    if _SCHEME_RE.match(storage_path):
        if storage_path.startswith("file://"):
            return str(Path(storage_path[len("file://") :]).resolve())
        return storage_path.rstrip("/")
    return str(Path(storage_path).expanduser().resolve())


class RunDir:
    """``<storage_path>/<name>``: read/write CaloForge's files next to Ray Train's."""

    def __init__(self, storage_path: str | None, name: str) -> None:
        self.storage_path = resolve_storage_path(storage_path)
        self.name = validate_run_name(name)
        try:
            self.fs, root = pafs.FileSystem.from_uri(self.storage_path)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with its own message
            raise ValueError(
                f"storage_path {self.storage_path!r}: not a usable filesystem URI ({exc})"
            ) from exc
        self.root = f"{root.rstrip('/')}/{name}"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.uri = f"{self.storage_path}/{name}"

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def local_path(self) -> Path:
        """The directory on this machine (local storage only)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on a local filesystem")
        return Path(self.root)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # -- queries ---------------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        if not self.exists():
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))

    def listdir(self, rel: str = "") -> list[str]:
        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=False))
        return sorted(Path(i.path).name for i in infos)

    def ray_checkpoints(self) -> list[str]:
        """Names of Ray Train checkpoint directories (``checkpoint_*``), oldest first by name."""
        return [n for n in self.listdir() if n.startswith("checkpoint_") and not n.endswith(".json")]

    # -- reading / writing -----------------------------------------------------------------------------
    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self._path(rel)) as fh:
            return fh.read().decode()

    def read_json(self, rel: str) -> Any:
        text = self.read_text(rel)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self._path(rel)}: not valid JSON ({exc})") from exc

    def write_text(self, rel: str, text: str) -> None:
        """Write a file atomically (local: temp + rename; object stores: one PUT)."""
        target = self._path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp_")
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, _FILE_MODE)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            with self.fs.open_output_stream(target) as fh:
                fh.write(text.encode())

    def remove_dir(self, rel: str) -> None:
        """Delete the directory ``rel`` and everything below it (nothing when it does not exist)."""
        if not rel or not self.exists(rel):
            return
        if self.is_local:
            shutil.rmtree(self._path(rel))
        else:
            self.fs.delete_dir(self._path(rel))

    def remove(self, rel: str) -> None:
        """Delete the file ``rel`` (nothing when it does not exist)."""
        if self.exists(rel):
            self.fs.delete_file(self._path(rel))

    def write_json(self, rel: str, data: Any) -> None:
        self.write_text(rel, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def upload_dir(self, local_dir: Path, rel: str) -> None:
        """Replace ``rel`` by a copy of ``local_dir`` (local: copy to a temp dir, then rename)."""
        local_dir = Path(local_dir)
        if self.is_local:
            target = Path(self._path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            if local_dir.resolve() == target.resolve():
                return
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp_{target.name}_"))
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
            old = target.parent / f".old_{target.name}"
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            if old.exists():
                shutil.rmtree(old)
            return
        if self.exists(rel):
            self.fs.delete_dir(self._path(rel))
        self.fs.create_dir(self._path(rel), recursive=True)
        pafs.copy_files(str(local_dir), self._path(rel), destination_filesystem=self.fs)

    def upload_file(self, local_file: Path, rel: str) -> None:
        local_file = Path(local_file)
        if self.is_local and local_file.resolve() == Path(self._path(rel)).resolve():
            return
        self.write_bytes(rel, local_file.read_bytes())

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self._path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(dir=Path(target).parent, prefix=".tmp_")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as fh:
                fh.write(data)

    def download_dir(self, rel: str, local_dir: Path) -> Path:
        """A local copy of ``rel`` (local storage: the directory itself, nothing copied)."""
        if not self.exists(rel):
            raise ValueError(f"{self._path(rel)} does not exist")
        if self.is_local:
            return Path(self._path(rel))
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self._path(rel), str(local_dir), source_filesystem=self.fs)
        return local_dir


class UploadRunFiles(Hook):
    """Remote storage: copy rank-local logs and metrics.jsonl into the run directory at each checkpoint."""

    def __init__(self, run: RunDir, files: dict[str, Path]) -> None:
        self.run, self.files = run, files

    def upload(self) -> None:
        for rel, path in self.files.items():
            if path.is_file():
                self.run.upload_file(path, rel)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.upload()

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None:
        self.upload()


class FaultInjection(Hook):
    """Test-only: raise in (or SIGKILL) worker ``rank`` after step ``step`` — once per run (a marker in the
    run directory keeps the restarted worker group, and later ``--resume`` launches, from failing again)."""

    def __init__(self, rank: int, step: int, my_rank: int, run: RunDir, kind: str = "raise") -> None:
        self.rank, self.step, self.my_rank, self.run, self.kind = rank, step, my_rank, run, kind

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self.my_rank != self.rank or step != self.step or self.run.exists(FAULT_MARKER):
            return
        self.run.write_json(
            FAULT_MARKER,
            {"rank": self.rank, "step": step, "at_unix": time.time(), "pid": os.getpid(), "kind": self.kind},
        )
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injection (test-only): worker rank {self.rank} fails after step {step}")
