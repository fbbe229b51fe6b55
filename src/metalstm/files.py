"""The one way this package writes a file: :func:`write_file`.

Every output (checkpoints, config.yaml, metrics rewrites, JSON results, figures, caches,
downloads) goes through it, so each promise holds everywhere:

* **Atomic.** A regular file is written to a temporary file in the same folder, flushed and
  fsync'ed, then renamed over the target: readers see the old file or the complete new one,
  never half of one. The temporary file is removed on any failure, Ctrl-C included.
* **Never replaces what is not a regular file.** A symlink is followed: its target is replaced
  atomically and the link stays a link. A character device or FIFO (``/dev/null``, a pipe) is
  written through, in place. A folder, block device or socket is refused.
* **Permissions follow the umask**, like any file the user creates.
* **One-line errors.** Any ``OSError`` becomes an :class:`~metalstm.errors.OutputError` (or the
  caller's error class) naming the file, e.g. a read-only folder, a parent that is a file, a full
  disk.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import stat
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from .errors import MetaLSTMError, OutputError

Content = bytes | str | Callable[[BinaryIO], object]


def write_file(
    path: str | Path, content: Content, *, error: type[MetaLSTMError] = OutputError
) -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary file) to
    ``path`` under the rules of this module; missing parent folders are created.

    Returns ``path``. Raises ``error`` (one line naming the file) when it cannot be written.
    """
    path = Path(path)
    target, kind = _target(path)
    refusal = _refusal(kind)
    if refusal:
        raise error(f"cannot write {path}: {refusal}; give a file name")
    try:
        if kind is None or stat.S_ISREG(kind):
            _replace_atomically(target, content)
        else:
            _write_through(target, content)
    except OSError as exc:
        if exc.errno == errno.ENXIO and kind is not None and stat.S_ISFIFO(kind):
            raise error(f"cannot write {path}: no process reads this FIFO; start one") from None
        raise error(
            f"cannot write {path}: {describe(exc)}; check the folder exists, is writable and has "
            "free space"
        ) from None
    return path


def output_path(text: str) -> Path:
    """The ``type`` of a command-line option naming an output file: a name ending in a path
    separator names a folder and is refused (``Path`` would silently drop the separator)."""
    if not text or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder; give a file name")
    return Path(text)


def check_output(path: str | Path, *, error: type[MetaLSTMError] = OutputError) -> Path:
    """Refuse, before any work, an output :func:`write_file` would refuse: a folder, a block
    device or socket, or a file whose folder cannot be created. Returns ``path``."""
    path = Path(path)
    target, kind = _target(path)
    refusal = _refusal(kind)
    if refusal:
        raise error(f"cannot write {path}: {refusal}; give a file name")
    folder = target.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise error(f"cannot write {path}: {folder} is a file, not a folder; give another path")
    if kind is None and not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"cannot write {path}: {folder} is not writable; give another path")
    return path


def _target(path: Path) -> tuple[Path, int | None]:
    """The file ``path`` names after following symlinks, and its mode (None: it does not exist)."""
    target = Path(os.path.realpath(path))
    try:
        return target, os.stat(target).st_mode
    except OSError:  # missing, or a loop / too long a name, which opening reports
        return target, None


def _refusal(kind: int | None) -> str:
    """Why an existing file of mode ``kind`` may not be written ('' when it may)."""
    if kind is None or stat.S_ISREG(kind) or stat.S_ISCHR(kind) or stat.S_ISFIFO(kind):
        return ""
    return "it is a folder" if stat.S_ISDIR(kind) else "it is not a regular file"


def describe(exc: OSError) -> str:
    """An ``OSError`` on one line, without the file name the caller states anyway."""
    return " ".join((exc.strerror or str(exc) or type(exc).__name__).split())


def make_folder(path: Path, *, error: type[MetaLSTMError] = OutputError) -> None:
    """``mkdir -p path``, with a one-line ``error`` when it cannot be created."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"cannot create folder {path}: a file is in the way; give a folder") from None
    except OSError as exc:
        raise error(f"cannot create folder {path}: {describe(exc)}; check the path") from None


def _emit(handle: BinaryIO, content: Content) -> None:
    if isinstance(content, str):
        handle.write(content.encode())
    elif isinstance(content, bytes):
        handle.write(content)
    else:
        content(handle)


def _replace_atomically(target: Path, content: Content) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        with tmp.open("xb") as handle:  # unlike mkstemp's 0600, honours the umask
            _emit(handle, content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        with suppress(OSError):
            tmp.unlink()
    _fsync_folder(target.parent)


def _write_through(target: Path, content: Content) -> None:
    """Write into a device or FIFO in place; a FIFO nobody reads is refused, not waited on."""
    fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as handle:
        _emit(handle, content)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows it (POSIX); ignore it elsewhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
