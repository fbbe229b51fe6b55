"""The meta-learner's inner step as fused kernels: one autograd node with a hand-written backward.

One inner step of both layers of the meta-learner (:mod:`.cell`) is :func:`step_forward`, and its
backward :func:`step_backward`, optionally through ``torch.compile`` (``Config.compile``). Tests
compare both with the plain formulation (tests/test_speed_paths.py); ``metalstm bench`` times them.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...layers import single_threaded


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. (2016) preprocessing of every scalar of x [...] into [..., 2].

    (log|x| / p, sign x) when |x| ≥ e^-p, else (−1, e^p · x): gradients spanning many orders of
    magnitude become inputs of comparable scale.
    """
    return torch.stack(_preprocess_parts(x, p), dim=-1)


def _preprocess_parts(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """The log part and the sign part of :func:`preprocess`, each shaped like x.

    The constants e^-p and e^p are Python (double) floats, rounded to x's dtype by the ops.
    """
    threshold, scale = math.exp(-p), math.exp(p)
    big = x.abs() >= threshold
    log_part = torch.where(big, x.abs().clamp_min(1e-38).log() / p, torch.full_like(x, -1.0))
    sign_part = torch.where(big, torch.sign(x), x * scale)
    return log_part, sign_part


def preprocess_rows(x: Tensor, p: float = 10.0) -> Tensor:
    """:func:`preprocess` of a vector x [n], laid out as rows [2, n]: (log part, sign part);
    of x [E, n] (E episodes), [E, 2, n]."""
    return torch.stack(_preprocess_parts(x, p), dim=-2)


def zero_state(like: Tensor, rows: int) -> Tensor:
    """Zeros [rows, n] (n = ``like``'s length; [E, rows, n] for ``like`` [E, n]) that take no
    memory: one zero expanded, so that nothing is written to make them, and the native step
    (:mod:`.native`) knows them for zeros without reading them (the LSTM's state at t = 0).
    Writing into them in place is an error."""
    return like.new_zeros((1,) * (like.dim() + 1)).expand(*like.shape[:-1], rows, like.shape[-1])


def is_zero_state(t: Tensor) -> bool:
    """Whether ``t`` is a :func:`zero_state` (one stored zero, expanded), or an episode's slice
    of one."""
    return t.dim() >= 2 and not any(t.stride()) and t.numel() > 0 and not t[(0,) * t.dim()].item()


# -- the fused inner step --------------------------------------------------------------------------
# Both layers of one inner step as a single autograd node with a hand-written backward. Autograd
# over the plain formulation records ~25 element-wise nodes per step on [H, n] tensors, each a
# full pass over memory, and its slice backward zero-fills a [4H, n] buffer per gate; here the
# forward keeps the gate activations and the backward is the textbook LSTM backward on them.
# Shapes: n coordinates, H hidden units; every [r, n] tensor is row-major (coordinates contiguous).


def step_forward(
    hidden: int,
    grad_features: Tensor,  # [2, n]   preprocessed g_t
    h: Tensor,  # [H, n]   layer-1 hidden state h_{t-1}
    c: Tensor,  # [H, n]   layer-1 cell state c_{t-1}
    theta: Tensor,  # [n]      θ_{t-1}
    prev_logits: Tensor,  # [2, n]   (f_{t-1}, i_{t-1})
    grad: Tensor,  # [n]      g_t
    weight: Tensor,  # [4H, 2 + H] layer-1 weight, columns (g features, h)
    bias: Tensor,  # [4H]     layer-1 bias with the loss features folded in
    gate_weight: Tensor,  # [2, H + 2] W_F, W_I: columns (h, θ, previous logit)
    gate_bias: Tensor,  # [2]      b_F, b_I
) -> tuple[Tensor, ...]:
    """One inner step; returns (θ_t, logits_t, h_t, c_t, gates_t) followed by what
    :func:`step_backward` needs, its ``saved``: (x, c_{t-1}, θ_{t-1}, logits_{t-1}, g_t, W, W2,
    acts, tanh c_t, gates_t, h_t), where ``x`` [2 + H, n] is layer 1's input and ``acts`` [4H, n]
    its activations (i, f, o: σ; g: tanh).
    """
    x = torch.cat([grad_features, h])  # [2 + H, n]
    acts = torch.addmm(bias.unsqueeze(1), weight, x)  # pre-activations z [4H, n]
    acts[: 3 * hidden].sigmoid_()  # i, f, o
    acts[3 * hidden :].tanh_()  # g, the candidate
    i, f, o, g = acts.split(hidden)
    c_new = torch.mul(f, c).addcmul_(i, g)  # c_t = f ⊙ c_{t-1} + i ⊙ g   [H, n]
    tanh_c = torch.tanh(c_new)
    h_new = torch.mul(o, tanh_c)  # h_t   [H, n]
    # Layer 2: (f_t, i_t) = W[:, :H] h_t + W[:, H] θ_{t-1} + W[:, H + 1] (f_{t-1}, i_{t-1}) + b.
    logits = torch.addmm(gate_bias.unsqueeze(1), gate_weight[:, :hidden], h_new)  # [2, n]
    logits.addcmul_(gate_weight[:, hidden : hidden + 1], theta)
    logits.addcmul_(gate_weight[:, hidden + 1 :], prev_logits)
    gates = torch.sigmoid(logits)  # σ(f_t), σ(i_t)
    theta_new = torch.mul(gates[0], theta).addcmul_(gates[1], grad, value=-1.0)
    saved = (x, c, theta, prev_logits, grad, weight, gate_weight, acts, tanh_c, gates, h_new)
    return theta_new, logits, h_new, c_new, gates, *saved


def step_backward(
    hidden: int,
    saved: tuple[Tensor, ...],
    d_theta: Tensor,  # [n]    ∂ℓ/∂θ_t
    d_logits: Tensor | None,  # [2, n] ∂ℓ/∂logits_t through the next step (None: not used)
    d_h: Tensor | None,  # [H, n]
    d_c: Tensor | None,  # [H, n]
    d_gates: Tensor | None,  # [2, n] when the returned gates themselves were used
    need_inputs: tuple[bool, bool],  # (∂ wrt g_t and its features, ∂ wrt parameters)
) -> tuple[Tensor | None, ...]:
    """Gradients of one step w.r.t. (features, h, c, θ, logits, g, weight, bias, W2, b2);
    ``saved`` is what :func:`step_forward` returned after the step's five outputs."""
    x, c, theta, prev_logits, grad, weight, gate_weight, acts, tanh_c, gates, h_new = saved
    need_grad_inputs, need_params = need_inputs
    one = theta.new_ones(())
    # Layer 2: θ_t = σ(f) θ_{t-1} − σ(i) g_t, (f, i) logits = W2 [h_t, θ_{t-1}, logits_{t-1}] + b2.
    d_l = torch.empty_like(gates)  # ∂ℓ/∂σ(f, i), then ∂ℓ/∂(f_t, i_t)   [2, n]
    torch.mul(d_theta, theta, out=d_l[0])
    torch.mul(d_theta, grad, out=d_l[1]).neg_()
    if d_gates is not None:
        d_l += d_gates
    d_l.mul_(torch.addcmul(gates, gates, gates, value=-1.0))  # σ' = σ − σ²
    if d_logits is not None:
        d_l += d_logits
    w_h, w_theta, w_prev = (
        gate_weight[:, :hidden],
        gate_weight[:, hidden],
        gate_weight[:, hidden + 1],
    )
    d_theta_prev = torch.mv(d_l.t(), w_theta).addcmul_(d_theta, gates[0])  # [n]
    d_prev_logits = d_l * w_prev.unsqueeze(1)  # [2, n]
    d_grad = -d_theta * gates[1] if need_grad_inputs else None
    d_gate_weight = d_gate_bias = None
    if need_params:
        # Products that sum over the n coordinates run on one thread: BLAS splits such long
        # reductions across threads in a thread-count-dependent order (see metalstm.layers).
        with single_threaded(theta.device):
            d_gate_weight = torch.cat(
                [d_l @ h_new.t(), (d_l @ theta).unsqueeze(1), (d_l * prev_logits).sum(1, True)],
                dim=1,
            )  # [2, H + 2]
        d_gate_bias = d_l.sum(1)
    # Layer 1: h_t = o ⊙ tanh c_t, c_t = f ⊙ c_{t-1} + i ⊙ g, (i, f, o, g) = act(W x + b).
    d_hn = torch.mm(w_h.t(), d_l) if d_h is None else torch.addmm(d_h, w_h.t(), d_l)  # [H, n]
    i, f, o, g = acts.split(hidden)
    d_cn = torch.mul(d_hn, o).mul_(torch.addcmul(one, tanh_c, tanh_c, value=-1.0))  # tanh'
    if d_c is not None:
        d_cn += d_c
    d_z = torch.empty_like(acts)  # ∂ℓ/∂z [4H, n]
    dz_i, dz_f, dz_o, dz_g = d_z.split(hidden)
    torch.mul(d_cn, g, out=dz_i)
    torch.mul(d_cn, c, out=dz_f)
    torch.mul(d_hn, tanh_c, out=dz_o)
    sig = acts[: 3 * hidden]
    d_z[: 3 * hidden].mul_(torch.addcmul(sig, sig, sig, value=-1.0))  # σ' = σ − σ²
    torch.mul(d_cn, i, out=dz_g).mul_(torch.addcmul(one, g, g, value=-1.0))  # tanh' = 1 − tanh²
    d_c_prev = d_cn.mul_(f)  # [H, n]
    d_weight = d_bias = None
    if need_params:
        with single_threaded(theta.device):  # a sum over the n coordinates, as above
            d_weight = torch.mm(d_z, x.t())  # [4H, 2 + H]
        d_bias = d_z.sum(1)
    if need_grad_inputs:
        d_x = torch.mm(weight.t(), d_z)  # [2 + H, n]
        d_features, d_h_prev = d_x[:2], d_x[2:]
    else:
        d_features, d_h_prev = None, torch.mm(weight[:, 2:].t(), d_z)
    return (
        d_features,
        d_h_prev,
        d_c_prev,
        d_theta_prev,
        d_prev_logits,
        d_grad,
        d_weight,
        d_bias,
        d_gate_weight,
        d_gate_bias,
    )


def _denormals_flushed() -> bool:
    """Whether this thread flushes subnormal floats to zero (FTZ/DAZ) right now."""
    tiny = sys.float_info.min  # the smallest normal double; half of it is subnormal
    return tiny * 0.5 == 0.0


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """Treat subnormal floats (below ~1e-38 in float32) as zero on this thread, inside only.

    The meta-learner's state, gradients and gate derivatives decay towards zero over the inner
    steps and the meta-backward, and arithmetic on subnormal values can be several times slower
    on x86 CPUs (the LSTM was seen slowing 5-10x); flushing them changes nothing measurable.
    The step kernels run inside this context, which restores the caller's setting on exit:
    FTZ is processor state shared by all code on the thread (NumPy, hypothesis, ...), so the
    library never leaves it switched on.
    """
    if _denormals_flushed() or not torch.set_flush_denormal(True):  # already on / unsupported
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@dataclass(frozen=True)
class StepKernels:
    """The forward and backward of one inner step: the eager functions here, their compiled
    versions, or native code (:mod:`.native`). ``forward`` returns (θ_t, logits_t, h_t, c_t,
    gates_t) followed by the tensors its ``backward`` takes as ``saved`` (each kernel set keeps
    what its own backward needs); ``infer``, when given, is a forward returning only the five
    outputs that keeps nothing for a backward (and may skip all but θ_t and the gates at the
    last step); ``chain``, when given, is the backward of steps
    1 .. T of a first-order meta-gradient at once (:class:`ChainedSteps`); ``preprocess`` is
    :func:`preprocess_rows` for inputs no gradient flows through (the native kernels' is one
    pass). ``episodes``: ``infer``, ``forward`` and ``chain`` also take E episodes at once (every
    per-coordinate tensor [E, ..., n], the layer-1 bias [E, 4H]) where the native kernels run
    (:func:`.native.takes`); other kernels, and ``backward``, take one."""

    name: str
    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., tuple[Tensor | None, ...]]
    infer: Callable[..., tuple[Tensor, ...]] | None = None
    chain: Callable[..., tuple[Tensor, ...]] | None = None
    preprocess: Callable[[Tensor, float], Tensor] = preprocess_rows
    episodes: bool = False

    def inference(self, hidden: int, *inputs: Tensor, last: bool = False) -> tuple[Tensor, ...]:
        """The step's first five outputs without a meta-graph (evaluation). ``last``: the inner
        loop's last step, of which only θ_t and the gates are read; ``infer`` may then skip
        logits_t, h_t and c_t (zero-size tensors in their place)."""
        if self.infer is not None:
            return self.infer(hidden, *inputs, last=last)
        return self.forward(hidden, *inputs)[:5]


EAGER_KERNELS = StepKernels("eager", step_forward, step_backward)


class CellStep(torch.autograd.Function):
    """One inner step (:func:`step_forward`) as a single autograd node (:func:`step_backward`)."""

    @staticmethod
    def forward(ctx: Any, kernels: StepKernels, hidden: int, *inputs: Tensor) -> tuple[Tensor, ...]:
        with flushing_denormals():
            theta_new, logits, h_new, c_new, gates, *saved = kernels.forward(hidden, *inputs)
        ctx.kernels, ctx.hidden = kernels, hidden
        ctx.theta_meta = (theta_new.shape, theta_new.dtype, theta_new.device)
        ctx.save_for_backward(*saved)
        return theta_new, logits, h_new, c_new, gates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        d_theta, d_logits, d_h, d_c, d_gates = grads
        needs = (
            ctx.needs_input_grad
        )  # (kernels, hidden, features, h, c, θ, logits, g, W, b, W2, b2)
        if d_theta is None:  # θ_t unused: only the recurrent outputs carry gradient
            shape, dtype, device = ctx.theta_meta
            d_theta = torch.zeros(shape, dtype=dtype, device=device)
        need_inputs = (needs[2] or needs[7], any(needs[8:]))
        with flushing_denormals():
            out = ctx.kernels.backward(
                ctx.hidden, ctx.saved_tensors, d_theta, d_logits, d_h, d_c, d_gates, need_inputs
            )
        return (None, None, *out)


@dataclass(frozen=True)
class Chain:
    """Steps 1 .. t of a first-order inner loop, for :class:`ChainedSteps`: θ_0 as the loop got
    it (with its graph), then per step, step 1 first, its ``saved`` (what the kernels' forward
    returned after the five outputs, without graph) and its layer-1 weight and bias (with
    their graph)."""

    theta0: Tensor
    steps: tuple[tuple[Tensor, ...], ...] = ()
    weights: tuple[Tensor, ...] = ()
    biases: tuple[Tensor, ...] = ()


class ChainedSteps(torch.autograd.Function):
    """θ_t of a first-order inner loop as one autograd node over steps 1 .. t.

    First-order, L_t and g_t are constants, so θ_T depends on the meta-learner's parameters
    only through the chain of steps, and nothing else reads the steps' h, c and logits: the
    backward of all T steps is one call of the kernels' ``chain``, which keeps the gradients
    passed from step to step in cache, where T nodes would write them out and read them back.
    Inputs: θ_t's value, θ_0, W2, b2, then each step's own layer-1 weight and bias (they are
    built per step from the loss features), steps 1 .. t. Each step makes one such node; only
    θ_T's is in the meta-graph.
    """

    @staticmethod
    def forward(
        ctx: Any, kernels: StepKernels, hidden: int, chain: Chain, theta: Tensor, *params: Tensor
    ) -> Tensor:
        ctx.kernels, ctx.hidden, ctx.chain = kernels, hidden, chain
        return theta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_theta: Tensor) -> tuple[Tensor | None, ...]:
        assert ctx.kernels.chain is not None
        with flushing_denormals():
            d_theta0, d_w, d_b, d_w2, d_b2 = ctx.kernels.chain(ctx.hidden, ctx.chain.steps, d_theta)
        return (None, None, None, None, d_theta0, d_w2, d_b2, *d_w.unbind(0), *d_b.unbind(0))


_compiled: dict[str, StepKernels] = {}


def compiled_kernels() -> StepKernels:
    """The step kernels through ``torch.compile`` (built once per process, compiled lazily per
    shape on first use); each falls back to eager for good if compilation fails, e.g. without a
    C++ compiler on the CPU."""
    if "kernels" not in _compiled:
        _compiled["kernels"] = StepKernels(
            "torch.compile", _CompileOrEager(step_forward), _CompileOrEager(step_backward)
        )
    return _compiled["kernels"]


class _CompileOrEager:
    """``torch.compile(fn)``, or ``fn`` itself once compiling has failed (with one warning)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        except Exception as error:  # torch.compile unsupported here (e.g. Python version)
            self._give_up(error)

    def _give_up(self, error: Exception) -> None:
        warnings.warn(
            f"torch.compile unavailable for {self.fn.__name__} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); running it eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        self.compiled = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # compiler missing or failing: same math, eagerly
                self._give_up(error)
        return self.fn(*args)
