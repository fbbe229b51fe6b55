"""The inner step's kernels as native code: ``native_step.cpp``, built on first use when a C++
compiler is present.

:func:`step_forward` and :func:`step_backward` have the signatures of their eager counterparts in
:mod:`.kernels` and compute the same mathematics, fused per coordinate: every value of a
coordinate stays in registers or L1 cache while it is computed, where the eager kernels make one
pass over memory per operation on [H, n] tensors. The sums over coordinates (parameter
gradients) are taken in fixed blocks added in order, so results do not depend on the number of
threads. Tests compare both with the eager kernels (tests/test_speed_paths.py).

The library is compiled once per source, compiler and CPU (``-O3 -march=native -fopenmp``)
into ``$METALSTM_CACHE/native`` (default ``~/.cache/metalstm/native``) and loaded with
:mod:`ctypes`: no build step at install, nothing to compile for users without a compiler, who
get the eager kernels. The path
is used for float32 CPU tensors; ``METALSTM_NATIVE=0`` turns it off. :func:`status` says which
path runs and why (``metalstm bench`` prints it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache, partial
from pathlib import Path

import torch
from torch import Tensor

from ...data.storage import CACHE_ENV, user_cache_dir
from ...errors import OutputError
from ...files import write_file
from . import kernels

SOURCE = Path(__file__).with_name("native_step.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ABI = 1  # metalstm_native_abi() of the source this module calls
MAX_HIDDEN = 64  # the source's MAX_H: larger hidden sizes run the eager kernels


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here; the message says why (one line)."""


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


def _build(compiler: str, target: Path) -> None:
    """Compile the source into ``target`` (written atomically: concurrent builds are safe)."""
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(built)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeUnavailable(f"{compiler} failed to run: {exc}") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise NativeUnavailable(f"{compiler} failed on {SOURCE.name}: {first}")
        try:
            write_file(target, built.read_bytes())
        except OutputError as exc:
            raise NativeUnavailable(str(exc)) from None


def library() -> ctypes.CDLL:
    """The loaded native library, built first if needed; raises :class:`NativeUnavailable`."""
    loaded = _load()
    if isinstance(loaded, str):
        raise NativeUnavailable(loaded)
    return loaded


@cache
def _load() -> ctypes.CDLL | str:
    """The library, or why it cannot be had: once per process, failures included."""
    try:
        return _build_and_load()
    except NativeUnavailable as why:
        return str(why)


def _build_and_load() -> ctypes.CDLL:
    if os.environ.get("METALSTM_NATIVE", "1") == "0":
        raise NativeUnavailable("turned off by METALSTM_NATIVE=0")
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"native_step-{key}.so"
    if not target.exists():
        _build(compiler, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load {target}: {exc}") from None
    lib.metalstm_native_max_hidden.restype = ctypes.c_long
    if lib.metalstm_native_abi() != ABI or lib.metalstm_native_max_hidden() != MAX_HIDDEN:
        raise NativeUnavailable(f"{target} is not this version's library")
    for name, pointers in (("metalstm_step_forward", 18), ("metalstm_step_backward", 26)):
        getattr(lib, name).argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_int] + [
            ctypes.c_void_p
        ] * pointers
        getattr(lib, name).restype = None
    return lib


def status() -> str:
    """Which step kernels run on float32 CPU tensors here, in words (and why not native)."""
    loaded = _load()
    if isinstance(loaded, str):
        return f"eager (native unavailable: {loaded})"
    return "native (C++, fused per coordinate)"


def step_kernels(compile: bool, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernels run the meta-learner's inner step for these settings, in words."""
    if compile:
        return "torch.compile"
    if device.type != "cpu" or dtype != torch.float32:
        return "eager"
    return status()


def available() -> bool:
    """Whether the native library is loaded (built first if needed) in this process."""
    return not isinstance(_load(), str)


def applies(*tensors: Tensor | None) -> bool:
    """Whether the native kernels take these tensors: float32, on the CPU."""
    present = [t for t in tensors if t is not None]
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in present)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def step_forward(
    hidden: int,
    grad_features: Tensor,
    h: Tensor,
    c: Tensor,
    theta: Tensor,
    prev_logits: Tensor,
    grad: Tensor,
    weight: Tensor,
    bias: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    keep: bool = True,
) -> tuple[Tensor, ...]:
    """:func:`.kernels.step_forward` fused; ``keep=False`` (evaluation) returns only the first
    five outputs, and nothing is written for a backward."""
    inputs = (grad_features, h, c, theta, prev_logits, grad, weight, bias, gate_weight, gate_bias)
    if not applies(*inputs) or hidden > MAX_HIDDEN:
        out = kernels.step_forward(hidden, *inputs)
        return out if keep else out[:5]
    pointers = [t.detach().contiguous() for t in inputs]  # kept alive until the call returns
    n = theta.shape[0]
    empty = theta.new_empty
    theta_new, logits, h_new, c_new, gates = (
        empty(n),
        empty(2, n),
        empty(hidden, n),
        empty(hidden, n),
        empty(2, n),
    )
    x, acts, tanh_c = (
        (empty(2 + hidden, n), empty(4 * hidden, n), empty(hidden, n)) if keep else (None,) * 3
    )
    library().metalstm_step_forward(
        n,
        hidden,
        torch.get_num_threads(),
        *(t.data_ptr() for t in pointers),
        *(_ptr(t) for t in (theta_new, logits, h_new, c_new, gates, x, acts, tanh_c)),
    )
    if not keep:
        return theta_new, logits, h_new, c_new, gates
    assert x is not None and acts is not None and tanh_c is not None
    return theta_new, logits, h_new, c_new, gates, x, acts, tanh_c


def step_backward(
    hidden: int,
    saved: tuple[Tensor, ...],
    d_theta: Tensor,
    d_logits: Tensor | None,
    d_h: Tensor | None,
    d_c: Tensor | None,
    d_gates: Tensor | None,
    need_inputs: tuple[bool, bool],
) -> tuple[Tensor | None, ...]:
    """:func:`.kernels.step_backward` fused (same arguments, same results)."""
    grads = (d_theta, d_logits, d_h, d_c, d_gates)
    if not applies(*saved, *grads) or hidden > MAX_HIDDEN:
        return kernels.step_backward(hidden, saved, *grads, need_inputs)
    x, c, theta, prev_logits, grad, weight, gate_weight, acts, tanh_c, gates, h_new = (
        t.detach().contiguous() for t in saved
    )
    incoming = [None if t is None else t.contiguous() for t in grads]
    need_grad_inputs, need_params = need_inputs
    n = theta.shape[0]
    empty = theta.new_empty
    d_h_prev, d_c_prev, d_theta_prev, d_prev_logits = (
        empty(hidden, n),
        empty(hidden, n),
        empty(n),
        empty(2, n),
    )
    d_features, d_grad = (empty(2, n), empty(n)) if need_grad_inputs else (None, None)
    d_weight, d_bias, d_gate_weight, d_gate_bias = (
        (empty(weight.shape), empty(weight.shape[0]), empty(gate_weight.shape), empty(2))
        if need_params
        else (None,) * 4
    )
    outputs: tuple[Tensor | None, ...] = (d_features, d_h_prev, d_c_prev, d_theta_prev)
    outputs += (d_prev_logits, d_grad, d_weight, d_bias, d_gate_weight, d_gate_bias)
    library().metalstm_step_backward(
        n,
        hidden,
        torch.get_num_threads(),
        *(t.data_ptr() for t in (x, c, theta, prev_logits, grad, weight, gate_weight)),
        *(t.data_ptr() for t in (acts, tanh_c, gates, h_new)),
        *(_ptr(t) for t in incoming),
        *(_ptr(t) for t in outputs),
    )
    return outputs


NATIVE_KERNELS = kernels.StepKernels(
    "native", step_forward, step_backward, partial(step_forward, keep=False)
)


def default_kernels() -> kernels.StepKernels:
    """The step kernels used unless ``Config.compile`` asks for torch.compile: native where
    available (they fall back to eager per call on other dtypes and devices), else eager."""
    return NATIVE_KERNELS if available() else kernels.EAGER_KERNELS
