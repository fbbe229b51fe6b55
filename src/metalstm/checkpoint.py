"""Checkpoint files: one ``.safetensors`` file, written atomically, verified on load, never pickled.

Format (``format_version`` 1)
-----------------------------
A checkpoint is a plain `safetensors <https://github.com/huggingface/safetensors>`_ file: an 8-byte
little-endian header length, a JSON header, then the raw tensor bytes. Its tensors are the
meta-learner's weights and, optionally, the optimizer state tensors. The header's string metadata
(``__metadata__``) holds:

``format``
    ``"metalstm-checkpoint"``; any other file is refused as foreign.
``format_version``
    ``"1"``.
``meta``
    A JSON document chosen by the caller: config, algorithm name, episode counter, random generator
    states, validation history, ... (anything JSON-serialisable).
``sha256``
    A hex SHA-256 over, for each tensor in sorted name order, ``json.dumps([name, dtype, shape])``,
    a zero byte and the tensor's raw little-endian bytes; then the ``meta`` string. A truncated or
    bit-flipped file fails this check (or an earlier structural one) and is reported in one line.

Safety: safetensors files hold data only, so loading cannot run code. Files that start like a
pickle or a zip archive (``torch.save``) are refused by their first bytes and never unpickled.

Writes go through :func:`metalstm.files.write_file`: a temporary file in the target folder, flushed
and fsync'ed, then renamed over the final name: a crash mid-write leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from metalstm.errors import CheckpointError
from metalstm.files import write_file

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUFFIX",
    "list_pretrained",
    "load_checkpoint",
    "read_checkpoint_meta",
    "resolve_checkpoint",
    "save_checkpoint",
]

FORMAT = "metalstm-checkpoint"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_NOT_SAFE = "metalstm only loads .safetensors checkpoints, which cannot run code"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _with_suffix(path: Path) -> Path:
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def _checksum(tensors: Mapping[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over sorted (name, dtype, shape, raw bytes) of CPU contiguous tensors, then meta."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(meta_json.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> Path:
    """Atomically write ``tensors`` and the JSON-serialisable ``meta`` to one checkpoint file.

    ``.safetensors`` is appended to ``path`` when missing and missing folders are created.
    Returns the path written.
    """
    path = _with_suffix(Path(path))
    cpu: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"cannot save checkpoint {path}: entry {name!r} is not a str -> torch.Tensor pair; "
                "pass only named tensors"
            )
        cpu[name] = t.detach().to("cpu", copy=True).contiguous()
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot save checkpoint {path}: meta is not JSON-serialisable ({_one_line(exc)}); "
            "pass only str, number, bool, None, list and dict values"
        ) from exc
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta_json,
        "sha256": _checksum(cpu, meta_json),
    }
    data = _st_save(cpu, metadata=metadata)

    return write_file(path, data, error=CheckpointError)


# --------------------------------------------------------------------------------------- load


def _looks_like_pickle(head: bytes) -> bool:
    """Zip archives (``torch.save`` since 1.6) and protocol 2+ pickles (legacy ``torch.save``)."""
    return head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5)


def _read_header(path: Path, f: BinaryIO, size: int) -> tuple[str, str]:
    """Validate the file's structure and format tag; return its (meta JSON, sha256) strings."""
    head = f.read(8)
    if len(head) < 8:
        if _looks_like_pickle(head):
            raise CheckpointError(f"{path} is a pickle/torch.save file; {_NOT_SAFE}")
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a checkpoint ({size} bytes); "
            "use an earlier checkpoint or save it again"
        )
    (n,) = struct.unpack("<Q", head)
    first = f.read(1) if 2 <= n <= _MAX_HEADER else b""
    if first != b"{":
        if _looks_like_pickle(head):
            raise CheckpointError(f"{path} is a pickle/torch.save file; {_NOT_SAFE}")
        raise CheckpointError(
            f"{path} is not a safetensors checkpoint (unrecognised header); {_NOT_SAFE}"
        )
    if 8 + n > size:
        raise CheckpointError(
            f"checkpoint {path} is truncated ({size} bytes, header alone needs {8 + n}); "
            "use an earlier checkpoint or save it again"
        )
    try:
        header = json.loads((first + f.read(n - 1)).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted (unreadable header: {_one_line(exc)}); "
            "use an earlier checkpoint or save it again"
        ) from exc
    corrupted = CheckpointError(
        f"checkpoint {path} is corrupted (malformed safetensors header); "
        "use an earlier checkpoint or save it again"
    )
    if not isinstance(header, dict):
        raise corrupted
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a metalstm checkpoint (no format tag "
            f"{FORMAT!r}); pass a checkpoint written by metalstm"
        )
    version = metadata.get("format_version")
    if not isinstance(version, str):
        raise corrupted
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, this metalstm reads "
            f"{FORMAT_VERSION!r}; use a compatible metalstm version"
        )
    meta_json, digest = metadata.get("meta"), metadata.get("sha256")
    if not isinstance(meta_json, str) or not isinstance(digest, str):
        raise corrupted
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            raise corrupted
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(
            f"checkpoint {path} is truncated ({size} of {8 + n + end} bytes); "
            "use an earlier checkpoint or save it again"
        )
    return meta_json, digest


def _open(path: str | Path) -> tuple[Path, BinaryIO, int]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file; pass {path / ('best' + SUFFIX)} "
            f"or {path / ('last' + SUFFIX)}"
        )
    try:
        f = path.open("rb")
        return path, f, os.fstat(f.fileno()).st_size
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path (run folders hold best{SUFFIX} "
            f"and last{SUFFIX})"
        ) from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {_one_line(exc)}; check the path and its permissions"
        ) from exc


def _parse_meta(path: Path, meta_json: str) -> dict[str, Any]:
    try:
        meta = json.loads(meta_json)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"checkpoint {path} is corrupted (its 'meta' is not a JSON object); "
            "use an earlier checkpoint or save it again"
        )
    return meta


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """Return a checkpoint's ``meta`` from its header alone, without reading the tensor data.

    The format tag and the file's length are checked; the checksum is not (use
    :func:`load_checkpoint` for a verified read).
    """
    path, f, size = _open(path)
    with f:
        meta_json, _ = _read_header(path, f, size)
    return _parse_meta(path, meta_json)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; return ``(tensors on device, meta)``.

    Raises :class:`~metalstm.errors.CheckpointError` (one line, naming the file) for a missing,
    truncated, corrupted (checksum mismatch), foreign or pickle file. Nothing is ever unpickled.
    """
    path, f, size = _open(path)
    with f:
        meta_json, digest = _read_header(path, f, size)
        f.seek(0)
        data = f.read()
    try:
        tensors = _st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others)
        raise CheckpointError(
            f"checkpoint {path} is corrupted (unreadable tensor data: {_one_line(exc)}); "
            "use an earlier checkpoint or save it again"
        ) from exc
    if not hmac.compare_digest(_checksum(tensors, meta_json), digest):
        raise CheckpointError(
            f"checkpoint {path} is corrupted (checksum mismatch): its content changed after it "
            "was written; use an earlier checkpoint or save it again"
        )
    meta = _parse_meta(path, meta_json)
    return {name: t.to(device) for name, t in tensors.items()}, meta


# ----------------------------------------------------------------------------------- resolve


def _pretrained_dir() -> Path:
    root = resources.files(__package__ or "metalstm")
    base = root if isinstance(root, Path) else Path(__file__).resolve().parent
    return base / "pretrained"


def _valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and ".." not in name


def _names_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [p.stem for p in folder.glob("*" + SUFFIX) if _valid_name(p.stem)]


def list_pretrained(*, search_dirs: Sequence[Path] = ()) -> list[str]:
    """Names of shipped checkpoints: ``metalstm/pretrained/``, then ``search_dirs``."""
    names: set[str] = set()
    for folder in (_pretrained_dir(), *map(Path, search_dirs)):
        names.update(_names_in(folder))
    return sorted(names)


def _shipped_files(name: str, search_dirs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """``(folder, file)`` of each shipped checkpoint file named ``name`` (a valid shipped name),
    the package's folder first."""
    if not _valid_name(name):
        return []
    folders = (_pretrained_dir(), *map(Path, search_dirs))
    return [(f, f / (name + SUFFIX)) for f in folders if (f / (name + SUFFIX)).is_file()]


def resolve_checkpoint(name_or_path: str, *, search_dirs: Sequence[Path] = ()) -> Path:
    """Turn a user's ``--checkpoint`` value into a checkpoint file path.

    Accepts, in order: an existing file; a path without the ``.safetensors`` suffix
    (``runs/x/best``); a run folder (its ``best.safetensors``, else ``last.safetensors``); or the
    bare name of a shipped checkpoint in ``metalstm/pretrained/`` or ``search_dirs``. Shipped
    names must match ``^[A-Za-z0-9][A-Za-z0-9._-]*$`` without ``..`` and cannot leave their folder.
    The file itself is not read: pass the result to :func:`load_checkpoint`.
    """
    if not name_or_path.strip():
        raise CheckpointError(
            "empty checkpoint name; pass a .safetensors file, a run folder or a shipped name"
        )
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        for stem in ("best", "last"):
            if (path / (stem + SUFFIX)).is_file():
                return path / (stem + SUFFIX)
        hidden = _shipped_files(path.name, search_dirs) if str(path) == path.name else []
        hint = (
            f" (this folder hides the shipped checkpoint {path.name!r}: pass its file "
            f"{hidden[0][1]})"
            if hidden
            else ""
        )
        raise CheckpointError(
            f"run folder {path} holds neither best{SUFFIX} nor last{SUFFIX}; "
            f"pass a checkpoint file or a folder of a run that has validated{hint}"
        )
    if _with_suffix(path).is_file():
        return _with_suffix(path)

    name = name_or_path.removesuffix(SUFFIX)
    if not _valid_name(name):
        raise CheckpointError(
            f"checkpoint {name_or_path!r} does not exist and is not a valid shipped name "
            "(letters, digits, '.', '_', '-', no '..' or separators); check the path"
        )
    for folder, candidate in _shipped_files(name, search_dirs):
        if not candidate.resolve().is_relative_to(folder.resolve()):
            raise CheckpointError(
                f"shipped checkpoint {candidate} points outside {folder}; refusing to load it"
            )
        return candidate
    available = ", ".join(list_pretrained(search_dirs=search_dirs)) or "none"
    raise CheckpointError(
        f"no checkpoint file or shipped checkpoint named {name_or_path!r}; "
        f"shipped checkpoints: {available}"
    )
