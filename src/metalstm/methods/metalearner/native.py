"""The inner step's kernels as native code: ``native_step.cpp``, built on first use when a C++
compiler is present (:mod:`metalstm.native`).

:func:`step_forward` and :func:`step_backward` have the signatures of their eager counterparts in
:mod:`.kernels` and compute the same mathematics, fused per coordinate: every value of a
coordinate stays in registers or L1 cache while it is computed, where the eager kernels make one
pass over memory per operation on [H, n] tensors. The sums over coordinates (parameter
gradients) are taken in fixed blocks added in order, so results do not depend on the number of
threads. Tests compare both with the eager kernels (tests/test_speed_paths.py).

The path is used for float32 CPU tensors; without a compiler, or with ``METALSTM_NATIVE=0``, the
eager kernels run. :func:`status` says which path runs and why (``metalstm bench`` prints it).
"""

from __future__ import annotations

import ctypes
from functools import partial, reduce
from pathlib import Path

import torch
from torch import Tensor

from ... import native
from ...native import applies
from ...native import pointer as _ptr
from . import kernels

MAX_HIDDEN = 64  # the source's MAX_H: larger hidden sizes run the eager kernels
_HEAD = (ctypes.c_long, ctypes.c_long, ctypes.c_int)  # n, H, threads
SOURCE = native.NativeSource(
    Path(__file__).with_name("native_step.cpp"),
    constants=(("metalstm_native_abi", 6), ("metalstm_native_max_hidden", MAX_HIDDEN)),
    functions=(
        (
            "metalstm_preprocess",  # E, n, threads, x, p, out
            (
                ctypes.c_long,
                ctypes.c_long,
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_double,
                ctypes.c_void_p,
            ),
        ),
        ("metalstm_step_forward", (ctypes.c_long, *_HEAD, *[ctypes.c_void_p] * 15)),  # E first
        ("metalstm_step_backward", (*_HEAD, *[ctypes.c_void_p] * 25)),
        ("metalstm_chain_backward", (*_HEAD, ctypes.c_long, *[ctypes.c_void_p] * 16)),
    ),
)


def library() -> ctypes.CDLL:
    """The loaded step library; raises :class:`metalstm.native.NativeUnavailable`."""
    return native.library(SOURCE)


def status() -> str:
    """Which step kernels run on float32 CPU tensors here, in words (and why not native)."""
    return native.status(SOURCE, "native (C++, fused per coordinate)")


def step_kernels(compile: bool, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernels run the meta-learner's inner step for these settings, in words."""
    if compile:
        return "torch.compile"
    if device.type != "cpu" or dtype != torch.float32:
        return "eager"
    return status()


def available() -> bool:
    """Whether the step library is loaded (built first if needed) in this process."""
    return native.available(SOURCE)


def takes(hidden: int, *tensors: Tensor | None) -> bool:
    """Whether the native kernels compute a step of this hidden size on these tensors (float32,
    CPU); others run the eager kernels."""
    return applies(*tensors) and hidden <= MAX_HIDDEN


def preprocess_rows(x: Tensor, p: float = 10.0) -> Tensor:
    """:func:`.kernels.preprocess_rows` of x [n] (or [E, n]) in one pass: rows [2, n] (log part,
    sign part; [E, 2, n]), with ``log`` computed natively (about 1 ulp from PyTorch's). Not
    differentiable: for inputs the meta-gradient does not flow through. Other dtypes and
    devices: the eager function."""
    if not applies(x):
        return kernels.preprocess_rows(x, p)
    x = x.detach().contiguous()
    out = x.new_empty(*x.shape[:-1], 2, x.shape[-1])
    episodes = x.shape[0] if x.dim() == 2 else 1
    library().metalstm_preprocess(
        episodes, x.shape[-1], torch.get_num_threads(), x.data_ptr(), p, out.data_ptr()
    )
    return out


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
    last: bool = False,
) -> tuple[Tensor, ...]:
    """:func:`.kernels.step_forward` fused: the step's five outputs, then what
    :func:`step_backward` needs: the step's inputs and layer 2's gates, nothing written for it
    (the backward computes layer 1's gate activations, c_t, tanh c_t and h_t again from the
    inputs, where the eager kernels keep [6H + 2, n] more per step). ``keep=False`` (evaluation)
    returns only the five outputs, and with ``last`` too (the inner loop's last step, of which
    only θ_t and the gates are read) logits_t, h_t and c_t as zero-size tensors, not written.
    h and c as :func:`.kernels.zero_state` makes them (t = 1) are not read, and their products
    with W are skipped: the same numbers as with stored zeros. E episodes at once: every
    per-coordinate tensor with a leading E ([E, n], [E, r, n]) and the bias [E, 4H]; the weights
    are shared. Other dtypes and devices, and large hidden sizes, run the eager kernels (which
    write every output; one episode)."""
    inputs = (grad_features, h, c, theta, prev_logits, grad, weight, bias, gate_weight, gate_bias)
    if not takes(hidden, *inputs):
        if theta.dim() != 1:
            raise ValueError("the eager step kernels take one episode at a time")
        out = kernels.step_forward(hidden, *inputs)
        return out if keep else out[:5]
    # Only h and c (positions 1, 2) may be passed as zeros by a null pointer; a zero state is
    # kept as it is (contiguous() would write it out), every other input made contiguous. All
    # stay alive through the call; some are saved.
    zero = [k in (1, 2) and kernels.is_zero_state(t) for k, t in enumerate(inputs)]
    pointers = [t.detach() if z else t.detach().contiguous() for t, z in zip(inputs, zero)]
    *episodes, n = theta.shape  # [] or [E]
    empty = theta.new_empty
    skipped = last and not keep  # logits_t, h_t, c_t: not written
    outputs = (
        empty(*episodes, n),
        *(empty(*episodes, r, 0 if skipped else n) for r in (2, hidden, hidden)),
        empty(*episodes, 2, n),
    )
    library().metalstm_step_forward(
        episodes[0] if episodes else 1,
        n,
        hidden,
        torch.get_num_threads(),
        *(None if z else t.data_ptr() for t, z in zip(pointers, zero)),
        *(None if t.numel() == 0 else t.data_ptr() for t in outputs),
    )
    if not keep:
        return outputs
    features, h, c, theta, prev_logits, grad, weight, bias, gate_weight, _ = pointers
    gates = outputs[4]
    return (*outputs, features, h, c, theta, prev_logits, grad, weight, bias, gate_weight, gates)


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
    """:func:`.kernels.step_backward` fused: the same arguments, with ``saved`` what
    :func:`step_forward` returned after the five outputs, and the same results."""
    grads = (d_theta, d_logits, d_h, d_c, d_gates)
    if not takes(hidden, *saved, *grads):  # as step_forward: eager's saved
        return kernels.step_backward(hidden, saved, *grads, need_inputs)
    features, h, c, theta, prev_logits, grad, weight, bias, gate_weight, gates = (
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
        *(t.data_ptr() for t in (features, h, c, theta, prev_logits, grad, weight, bias)),
        *(t.data_ptr() for t in (gate_weight, gates)),
        *(_ptr(t) for t in incoming),
        *(_ptr(t) for t in outputs),
    )
    return outputs


def chain_backward(
    hidden: int, steps: tuple[tuple[Tensor, ...], ...], d_theta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of a first-order chain of steps (:class:`.kernels.ChainedSteps`) from
    ∂ℓ/∂θ_T alone: ``steps`` holds what :func:`step_forward` returned after the five outputs, for
    steps 1 .. T. Returns (∂θ_0 [n], ∂W [T, 4H, 2 + H], ∂b [T, 4H], ∂W2 [2, H + 2], ∂b2 [2]):
    the numbers T calls of :func:`step_backward` and autograd's sums of their ∂W2 and ∂b2 give,
    in one pass over the coordinates that keeps the gradients passed from step to step in cache.
    Steps of E episodes (d_theta [E, n]): each episode's chain in turn, ∂θ_0 [E, n] and ∂b
    [T, E, 4H] per episode, the shared weights' gradients added in episode order. Only for steps
    the native kernels computed (:func:`takes`).
    """
    if d_theta.dim() == 1:
        return _chain_backward(hidden, steps, d_theta)
    shared = (6, 8)  # W and W2 in `saved`: the same for every episode
    results = [
        _chain_backward(
            hidden,
            tuple(tuple(t if k in shared else t[e] for k, t in enumerate(s)) for s in steps),
            d_theta[e],
        )
        for e in range(d_theta.shape[0])
    ]
    d_theta_0 = torch.stack([r[0] for r in results])  # [E, n]
    d_bias = torch.stack([r[2] for r in results], dim=1)  # [T, E, 4H]
    d_weight, d_gate_weight, d_gate_bias = (
        reduce(torch.add, [r[k] for r in results]) for k in (1, 3, 4)
    )
    return d_theta_0, d_weight, d_bias, d_gate_weight, d_gate_bias


def _chain_backward(
    hidden: int, steps: tuple[tuple[Tensor, ...], ...], d_theta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`chain_backward` of one episode."""
    rows: list[list[Tensor | None]] = [[] for _ in range(9)]
    for saved in steps:
        features, h, c, theta, prev_logits, grad, weight, bias, gate_weight, gates = saved
        for k, t in enumerate((features, h, c, theta, prev_logits, grad, weight, bias, gates)):
            zero = k in (1, 2) and kernels.is_zero_state(t)  # the initial state: not read
            rows[k].append(None if zero else t.detach().contiguous())
    gate_weight, d_theta = steps[0][8].detach().contiguous(), d_theta.contiguous()
    count, n = len(steps), d_theta.shape[0]
    empty = d_theta.new_empty
    d_theta_0, d_weight, d_bias = (
        empty(n),
        empty(count, 4 * hidden, 2 + hidden),
        empty(count, 4 * hidden),
    )
    d_gate_weight, d_gate_bias = empty(2, hidden + 2), empty(2)
    arrays = [(ctypes.c_void_p * count)(*(_ptr(t) for t in row)) for row in rows]
    library().metalstm_chain_backward(
        n,
        hidden,
        torch.get_num_threads(),
        count,
        *arrays,
        gate_weight.data_ptr(),
        d_theta.data_ptr(),
        *(t.data_ptr() for t in (d_theta_0, d_weight, d_bias, d_gate_weight, d_gate_bias)),
    )
    return d_theta_0, d_weight, d_bias, d_gate_weight, d_gate_bias


NATIVE_KERNELS = kernels.StepKernels(
    "native",
    step_forward,
    step_backward,
    partial(step_forward, keep=False),
    chain_backward,
    preprocess_rows,
    episodes=True,
)


def default_kernels() -> kernels.StepKernels:
    """The step kernels used unless ``Config.compile`` asks for torch.compile: native where
    available (they fall back to eager per call on other dtypes and devices), else eager."""
    return NATIVE_KERNELS if available() else kernels.EAGER_KERNELS
