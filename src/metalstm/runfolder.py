"""Run folders: what belongs to a run, which folders may be (over)written, and the run's lock.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``last.safetensors``,
``last.prev.safetensors``, ``best.safetensors``, ``tensorboard/`` and, while a process trains in
it, the lock file ``.lock``. The promises:

* a new run goes only into a missing or empty folder, or with ``force`` into a folder that is a
  metalstm run (``config.yaml`` of metalstm keys, plus metrics or a checkpoint), where only the
  run's own files are removed;
* one process at a time: :func:`hold` takes an exclusive ``flock`` on ``.lock`` for the run's
  lifetime (the kernel releases it when the process dies, so a stale lock is simply taken over)
  and writes the owner's pid into it, for the message the next process gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .config import Config
from .data.storage import is_writable_dir
from .errors import ConfigError, OutputError
from .files import describe, make_folder

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = ("last.safetensors", "last.prev.safetensors", "best.safetensors")
TENSORBOARD = "tensorboard"
PRETRAIN = "pretrain"  # a phase run before meta-training (Method.pretraining), a run folder itself
LOCK = ".lock"


def read_config_values(run_dir: Path) -> dict[str, Any]:
    """The mapping in ``run_dir/config.yaml``, or a one-line :class:`ConfigError`."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a metalstm run folder (no {CONFIG}); check --resume")
    try:
        values = yaml.safe_load(path.read_bytes())
    except (OSError, yaml.YAMLError, ValueError) as exc:  # unreadable, not YAML, python tags
        reason = describe(exc) if isinstance(exc, OSError) else type(exc).__name__
        raise ConfigError(f"{path} is not a readable config ({reason}); restore it") from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ConfigError(f"{path} is not a mapping of config keys; restore it")
    return values


def is_run_folder(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a metalstm run: its config plus metrics or a checkpoint."""
    try:
        values = read_config_values(run_dir)
    except ConfigError:
        return False
    known = {f.name for f in fields(Config)}
    has_output = any((run_dir / name).exists() for name in (METRICS, *CHECKPOINTS))
    return bool(values) and set(values) <= known and has_output


def check_new_run_folder(run_dir: Path, *, force: bool) -> None:
    """Refuse an ``--out`` that a new run may not write to; reads, never writes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a folder for the run")
    if not is_writable_dir(run_dir):
        raise OutputError(
            f"cannot create run folder {run_dir}: the folder it would go in is not writable "
            "(or is a file); give another --out"
        )
    if not run_dir.is_dir() or all(entry.name == LOCK for entry in run_dir.iterdir()):
        return
    if not is_run_folder(run_dir):
        raise ConfigError(
            f"{run_dir} holds files that are not a metalstm run; give an empty or new folder "
            "as --out (--force only overwrites a run folder)"
        )
    if not force:
        raise ConfigError(
            f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
            "--force to overwrite it, or another --out"
        )


def clear_run_folder(run_dir: Path) -> None:
    """Remove a run's own files (never anything else in the folder)."""
    for name in (CONFIG, METRICS, *CHECKPOINTS):
        (run_dir / name).unlink(missing_ok=True)
    remove_stale_temporaries(run_dir)
    for folder in (run_dir / TENSORBOARD, run_dir / PRETRAIN):
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove the temporary files a process killed mid-write left behind (the caller holds the
    folder's lock, so none belongs to a live writer)."""
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Create ``run_dir`` if needed and hold its lock until the block ends.

    A second process gets a :class:`ConfigError` naming the owner's pid. A folder this call
    created is removed again when the block fails while the folder is still empty.
    """
    created = not run_dir.exists()
    make_folder(run_dir)
    path = run_dir / LOCK
    try:
        fd = _lock(path)
        try:
            yield
        finally:
            _release(path, fd)
    except BaseException:
        if created:
            _remove_if_empty(run_dir)
        raise


def _lock(path: Path) -> int:
    """An exclusive lock on ``path``, with this process's pid written in it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create lock file {path}: {describe(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{path.parent} is in use by metalstm process {owner} (lock {path}); wait for it "
                "to finish or stop it"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"cannot lock {path}: {describe(exc)}") from None
        with suppress(FileNotFoundError):  # the previous owner may have removed the file
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    with suppress(OSError):
        path.unlink()  # still holding the lock, so nobody else holds this file
    os.close(fd)


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):
        folder.rmdir()


def metric_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The well-formed lines of a ``metrics.jsonl`` (a JSON object with an integer ``step``) and
    their rows; other lines (cut short by a crash, edited, binary) are skipped."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {describe(exc)}; restore or remove it") from None
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and type(row.get("step")) is int:
            rows.append((line, row))
    return rows
