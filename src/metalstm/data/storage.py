"""Where data and caches live, atomic writes, and downloads.

* The data root is, in order: the ``data_root`` argument (``--data-root``), ``$METALSTM_DATA``, the
  per-user cache folder (``$XDG_CACHE_HOME/metalstm``, default ``~/.cache/metalstm``). Only the last
  one is filled by downloads: an explicit root is never written to by a download.
* Decoded-image caches live in ``$METALSTM_CACHE`` when set; else next to the data
  (``<dataset folder>/cache``) when that is writable; else in the per-user cache folder.
* Every file this package writes goes through :func:`metalstm.files.write_file`: a temporary file in
  the target folder, renamed over the target only once complete, removed on any error.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import stat
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, OutputError
from ..files import write_file

DATA_ENV = "METALSTM_DATA"
CACHE_ENV = "METALSTM_CACHE"
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DataRoot:
    """A resolved data root and whether the user chose it (argument or environment)."""

    path: Path
    explicit: bool


def user_cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/metalstm``, default ``~/.cache/metalstm``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "metalstm"


def find_data_root(data_root: str | Path | None = None) -> DataRoot:
    """Resolve the data root (see the module docstring), remembering whether it was explicit."""
    if data_root is not None and str(data_root) != "":
        return DataRoot(_existing_dir(Path(data_root).expanduser(), "the data root"), True)
    env = os.environ.get(DATA_ENV)
    if env:
        return DataRoot(_existing_dir(Path(env).expanduser(), f"${DATA_ENV}"), True)
    return DataRoot(user_cache_dir(), False)


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The data root: ``data_root``, else ``$METALSTM_DATA``, else the per-user cache folder."""
    return find_data_root(data_root).path


def _existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder; create it or point {what} elsewhere")
    return path


def is_writable_dir(path: Path) -> bool:
    """Whether ``path`` is (or could be created as) a folder we may write to.

    Permission bits are honoured even for root, so a read-only shared data folder stays untouched.
    """
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    if not probe.is_dir():
        return False
    mode = probe.stat().st_mode
    return bool(stat.S_IMODE(mode) & 0o222) and os.access(probe, os.W_OK | os.X_OK)


def cache_dirs(data_dir: Path, dataset: str) -> list[Path]:
    """Candidate cache folders, most preferred first (``$METALSTM_CACHE`` alone when set)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return [Path(env).expanduser()]
    return [data_dir / "cache", user_cache_dir() / dataset / "cache"]


def load_or_build_arrays(
    name: str,
    candidates: list[Path],
    build: Callable[[], Mapping[str, np.ndarray]],
    is_valid: Callable[[Mapping[str, np.ndarray]], bool],
) -> dict[str, np.ndarray]:
    """Arrays from the first valid cache file ``name`` in ``candidates``; else build and store them.

    A cache file that cannot be read or fails ``is_valid`` is ignored (and replaced). The new file
    goes to the first writable candidate, checked before the (slow) build.
    """
    for folder in candidates:
        arrays = _read_npz(folder / name)
        if arrays is not None and is_valid(arrays):
            return arrays
    target = next((d for d in candidates if is_writable_dir(d)), None)
    if target is None:
        tried = ", ".join(str(d) for d in candidates)
        raise DataError(
            f"no writable cache folder (tried {tried}); set {CACHE_ENV} to a writable folder"
        )
    arrays = dict(build())
    try:
        write_file(target / name, lambda handle: np.savez(handle, **arrays))  # type: ignore[arg-type]
    except OutputError as exc:
        raise DataError(f"{exc}, or set {CACHE_ENV} to a writable folder") from None
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def file_digests(path: Path) -> tuple[str, str]:
    """The ``(md5, sha256)`` hex digests of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


def download(url: str, dest: Path, what: str) -> None:
    """Download ``url`` to ``dest`` atomically, or raise a one-line :class:`DataError`."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()  # the archives are a few MB
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts...
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise DataError(
            f"{what} is missing and could not be downloaded ({reason}): "
            f"download {url} by hand and save it as {dest}"
        ) from exc
    write_file(dest, data, error=DataError)
