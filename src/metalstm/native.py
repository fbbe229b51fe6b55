"""Optional native kernels: C++ sources shipped with the package, built on first use.

A :class:`NativeSource` is compiled once per source, compiler and CPU (``-O3 -march=native
-fopenmp``) into ``$METALSTM_CACHE/native`` (default ``~/.cache/metalstm/native``), written
atomically, and loaded with :mod:`ctypes`: there is no build step at install and nothing to
compile for users without a compiler, whose code runs the PyTorch path the kernels replace.
``METALSTM_NATIVE=0`` turns every native kernel off; a comma-separated list of sources' names
(``METALSTM_NATIVE=native_step``) keeps those only. Failures are tried once per process and
their one-line reason kept (:func:`load`), for ``metalstm bench`` to print.

The sources: the meta-learner's inner step (``methods/metalearner/native_step.cpp``) and the
learner block's batch norm, max-pool and ReLU (``learner_block.cpp``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data.storage import CACHE_ENV, user_cache_dir
from .errors import OutputError
from .files import write_file

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ENV = "METALSTM_NATIVE"  # 0: no native kernels; 1 (default): all; or the sources' names


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here; the message says why (one line)."""


@dataclass(frozen=True)
class NativeSource:
    """A C++ source and what its library must export.

    ``constants``: functions returning a ``long`` that must equal the given values (an ABI
    version, limits the Python side relies on); ``functions``: the entry points as (name,
    argument types), each returning nothing.
    """

    path: Path
    constants: tuple[tuple[str, int], ...]
    functions: tuple[tuple[str, tuple[Any, ...]], ...]


def _cache_dir() -> Path:
    """``$METALSTM_CACHE/native``, else ``native`` in the per-user cache folder."""
    env = os.environ.get(CACHE_ENV)
    return (Path(env).expanduser() if env else user_cache_dir()) / "native"


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags: a library built with -march=native runs only
    where these match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(keep[:2])


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise NativeUnavailable("no C++ compiler (set CXX, or install g++)")


def _build(compiler: str, source: Path, target: Path) -> None:
    """Compile ``source`` into ``target`` (written atomically: concurrent builds are safe)."""
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, str(source), "-o", str(built)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeUnavailable(f"{compiler} failed to run: {exc}") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise NativeUnavailable(f"{compiler} failed on {source.name}: {first}")
        try:
            write_file(target, built.read_bytes())
        except OutputError as exc:
            raise NativeUnavailable(str(exc)) from None


def library(source: NativeSource) -> ctypes.CDLL:
    """The loaded library of ``source``, built first if needed; raises
    :class:`NativeUnavailable`."""
    loaded = load(source)
    if isinstance(loaded, str):
        raise NativeUnavailable(loaded)
    return loaded


def available(source: NativeSource) -> bool:
    """Whether the library of ``source`` is loaded (built first if needed) in this process."""
    return not isinstance(load(source), str)


def status(source: NativeSource, native: str) -> str:
    """Which kernels run here, in words: ``native`` when the library of ``source`` loads, else
    the PyTorch ("eager") ones and why."""
    loaded = load(source)
    return f"eager (native unavailable: {loaded})" if isinstance(loaded, str) else native


@cache
def load(source: NativeSource) -> ctypes.CDLL | str:
    """The library, or why it cannot be had: once per process and source, failures included."""
    try:
        return _build_and_load(source)
    except NativeUnavailable as why:
        return str(why)


def _build_and_load(source: NativeSource) -> ctypes.CDLL:
    wanted = os.environ.get(ENV, "1")
    if wanted == "0" or (wanted != "1" and source.path.stem not in wanted.split(",")):
        raise NativeUnavailable(f"turned off by {ENV}={wanted}")
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    text = source.path.read_text()
    key = hashlib.sha256(
        "\0".join([text, " ".join(FLAGS), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{source.path.stem}-{key}.so"
    if not target.exists():
        _build(compiler, source.path, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load {target}: {exc}") from None
    for name, value in source.constants:
        getattr(lib, name).restype = ctypes.c_long
        if getattr(lib, name)() != value:
            raise NativeUnavailable(f"{target} is not this version's library")
    for name, argtypes in source.functions:
        getattr(lib, name).argtypes = list(argtypes)
        getattr(lib, name).restype = None
    return lib


def applies(*tensors: Tensor | None) -> bool:
    """Whether native kernels take these tensors: float32, on the CPU."""
    present = [t for t in tensors if t is not None]
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in present)


def pointer(t: Tensor | None) -> int | None:
    """The address of a contiguous tensor's data, or None (a null pointer) for no tensor."""
    return None if t is None else t.data_ptr()
