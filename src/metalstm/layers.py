"""The learner's layers, computed so that a run does not depend on the CPU's thread count.

A meta-training run is a chaotic process: the learner is piecewise linear (ReLU, max-pool) on a
handful of support images, so a difference in the last bit of one activation can flip a ReLU or a
max-pool choice a few inner steps later, and Adam turns the changed meta-gradient into a different
step. Float rounding that depends on the number of threads therefore sends runs with 1 and 2
threads down different paths within a few updates. These PyTorch CPU kernels did that here:

- batch norm on channels-last tensors accumulates its statistics in float32 in a thread-dependent
  order, with errors up to 1e-4 relative on 28x28 Omniglot batches and 1e-3 at 84x84 (its weight
  gradient 1e-2): :func:`batch_norm_train` computes them in two passes with ATen's cascade sums
  instead (about 1e-7, the same bits for any thread count);
- oneDNN's convolution weight gradient sums over the batch in a thread-dependent order:
  :func:`conv3x3` computes it natively on every thread in an order fixed by the shapes
  (``learner_conv.cpp``) where a C++ compiler exists, else with oneDNN on one thread;
- MKL's small matrix products, and oneDNN's LSTM backward, on some CPUs (the output layer's weight
  gradient on an AMD EPYC of the Zen 3 generation): :func:`product` and :func:`one_thread` run
  them on one thread.

:func:`single_threaded` is the context that weight gradient's fallback, and the meta-learner's
long reductions over the n coordinates, run in. See README "Reproducibility" for what holds where.

A block's batch norm (with the batch's statistics), max-pool and ReLU run as one native kernel
where a C++ compiler exists (:func:`batch_norm_pool_relu`, ``learner_block.cpp``): two passes
over the activations forward and two back instead of about ten, its sums in double over fixed
blocks, so it too gives the same bits for any thread count. At evaluation a first block (an
image's few channels in) takes its convolution into that kernel too
(:func:`conv_normalise_pool_relu`), so its full-resolution output is never written.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run PyTorch's CPU kernels on one thread inside (nothing changes on other devices).

    The thread count is process state: the previous count is restored on exit. Code that runs
    PyTorch in several Python threads at once would see the change; the library never does.
    """
    threads = torch.get_num_threads()
    # Inside torch.compile (Config.compile) the thread count cannot change: the compiled kernels
    # are reproducible for one thread count only.
    if device.type != "cpu" or threads == 1 or torch.compiler.is_compiling():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _OneThreadCall(torch.autograd.Function):
    """fn(*inputs) and its backward, each on one thread (see one_thread)."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad(), single_threaded(leaves[0].device):
            out = fn(*leaves)
        ctx.graph = out, leaves
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_out: Tensor) -> Any:
        out, leaves = ctx.graph
        wanted = [x for x in leaves if x.requires_grad]
        with single_threaded(out.device):  # kept: a graph retained outside may run it again
            grads = iter(
                torch.autograd.grad(out, wanted, d_out, allow_unused=True, retain_graph=True)
            )
        return None, *(next(grads) if x.requires_grad else None for x in leaves)


def one_thread(fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """``fn(*inputs)``, its forward and its backward each on one thread (first derivatives only;
    ``fn`` must depend on nothing that needs a gradient but ``inputs``).

    For a composite PyTorch kernel whose backward rounds differently with the thread count: the
    backward of oneDNN's LSTM (Matching Networks' full context embedding) on an AMD EPYC of the
    Zen 3 generation."""
    return _OneThreadCall.apply(fn, *inputs)


class _OneThreadProduct(torch.autograd.Function):
    """a @ b (+ bias) forward, and the two products of its backward, on one thread."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.batched, ctx.has_bias = a.dim() == 3, bias is not None
        with single_threaded(a.device):
            if bias is None:
                return a @ b
            return torch.baddbmm(bias, a, b) if ctx.batched else torch.addmm(bias, a, b)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> Any:
        a, b = ctx.saved_tensors
        need_a, need_b, need_bias = ctx.needs_input_grad
        d_a = product(d_out, b.mT) if need_a else None
        d_b = product(a.mT, d_out) if need_b else None
        d_bias = None
        if need_bias and ctx.has_bias:  # bias [N], or [E, 1, N] for a batch
            with single_threaded(d_out.device):
                d_bias = d_out.sum(1, keepdim=True) if ctx.batched else d_out.sum(0)
        return d_a, d_b, d_bias


def product(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b + bias`` for a [M, K], b [K, N], bias [N] (or a batch: [E, M, K], [E, K, N],
    [E, 1, N]), forward and backward (to any order) on one thread.

    MKL's small products round differently with 1 and 2 threads on some CPUs (measured on an AMD
    EPYC, Zen 3: the head's weight gradient [5, 5]ᵀ x [5, 32] differed in its last bits, and a run
    of 24 episodes by 5e-3); a product of the learner's head is too small to gain from a second
    thread anyway. The forward is ``torch.addmm`` (``baddbmm``), as ``F.linear`` computes it."""
    return _OneThreadProduct.apply(a, b, bias)


# -- batch norm with the batch's own statistics ---------------------------------------------------


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean [C], biased variance [C] and centred values [B, C, H, W] of x, in two
    passes (sum, then the sum of squares about the mean)."""
    count = x.numel() // x.shape[1]
    mean = x.sum((0, 2, 3)) / count
    centred = x - mean.view(1, -1, 1, 1)
    return mean, centred.square().sum((0, 2, 3)) / count, centred


def _graph_constants(ctx: Any, *statistics: Tensor) -> tuple[Tensor, ...]:
    """A batch's statistics returned by an autograd function as constants of the graph."""
    ctx.mark_non_differentiable(*statistics)
    return statistics


class _BatchNormTrain(torch.autograd.Function):
    """y = (x + s − μ) · γ / sqrt(σ² + ε) + β with the batch's own μ, σ² of x + s, for a
    per-channel shift s (a conv bias), which cancels: y does not depend on it, and its gradient
    is exactly zero rather than the rounding noise that adding and subtracting it would leave.

    The backward is the textbook one (Ioffe & Szegedy 2015); under ``create_graph`` it recomputes
    the statistics from x, so second-order meta-gradients differentiate through them.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
    ) -> Any:
        mean, var, centred = _channel_moments(x)
        invstd = torch.rsqrt(var + eps)
        y = torch.addcmul(bias.view(1, -1, 1, 1), centred, (weight * invstd).view(1, -1, 1, 1))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y, *_graph_constants(ctx, mean + shift, var)

    @staticmethod
    def backward(ctx: Any, d_y: Tensor, _d_mean: Tensor, _d_var: Tensor) -> Any:
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: the statistics as functions of x
            mean, var, centred = _channel_moments(x)
            invstd = torch.rsqrt(var + ctx.eps)
        else:
            centred = x - mean.view(1, -1, 1, 1)
        count = x.numel() // x.shape[1]
        d_bias = d_y.sum((0, 2, 3))  # [C]
        d_weight = (d_y * centred).sum((0, 2, 3)) * invstd  # [C]
        # ∂x = γ/σ · (∂y − mean(∂y) − x̂ · mean(∂y · x̂))
        k = weight * invstd
        d_x = torch.addcmul((-k * d_bias / count).view(1, -1, 1, 1), d_y, k.view(1, -1, 1, 1))
        d_x = d_x.addcmul(centred, (-k * invstd * d_weight / count).view(1, -1, 1, 1))
        return d_x, torch.zeros_like(d_bias), d_weight, d_bias, None


def batch_norm_train(
    x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm of x + shift (x [B, C, H, W], shift [C]) with its own statistics, as
    ``F.batch_norm(x + shift[:, None, None], training=True)`` computes it.

    Returns y [B, C, H, W] and the batch's mean and biased variance [C] (constants of the
    graph), for :func:`update_running_stats`.
    """
    if x.numel() // x.shape[1] < 2:
        raise ValueError(f"batch norm needs more than 1 value per channel, got shape {x.shape}")
    return _BatchNormTrain.apply(x, shift, weight, bias, eps)


# -- batch norm, max-pool and ReLU: a block's tail, natively where possible ----------------------

_DIMS = (ctypes.c_long,) * 4 + (ctypes.c_int,)  # B, H, W, C, threads
_CONV_DIMS = (ctypes.c_long,) * 6 + (ctypes.c_int,)  # B, H, W, C_in, C, G, threads
_P, _EPS = ctypes.c_void_p, ctypes.c_float
BLOCK_SOURCE = native.NativeSource(
    Path(__file__).with_name("learner_block.cpp"),
    constants=(("metalstm_block_abi", 8),),
    functions=(
        ("metalstm_block_forward", (*_DIMS, _P, _P, _P, _EPS, *[_P] * 4)),
        ("metalstm_block_backward", (*_DIMS, *[_P] * 7, _EPS, _P, _P, _P)),
        ("metalstm_conv_block_forward", (*_CONV_DIMS, *[_P] * 4, _EPS, *[_P] * 4)),
        ("metalstm_conv_block_backward", (*_CONV_DIMS, *[_P] * 8, _EPS, *[_P] * 3)),
    ),
)


def block_kernels(
    device: torch.device | None = None, channels: int | None = None, pooled: bool = True
) -> str:
    """Which kernels run the learner blocks' batch norm, max-pool and ReLU on float32 tensors
    (on ``device`` with ``channels`` filters, when given) here, in words (and why not native).
    Blocks without max-pool (``pooled`` false: stride-2 convolutions) run PyTorch's."""
    if device is not None and device.type != "cpu":
        return "eager"
    if not pooled:
        return "eager (no max-pool to fuse)"
    if channels is not None and not _native_channels(channels):
        return "eager"
    return native.status(BLOCK_SOURCE, "native (C++, fused per pixel)")


def _native_channels(channels: int) -> bool:
    """Whether the native kernels take this many channels: a multiple of 8, up to 512."""
    return channels % 8 == 0 and channels <= 512


def pool_relu(y: Tensor) -> Tensor:
    """ReLU(2x2 max-pool(y)): a block's ReLU after its max-pool, on a quarter of the values;
    exact, since max-pool commutes with the monotone ReLU (gradients agree too)."""
    return F.relu(F.max_pool2d(y, 2))


def _reference_tail(
    x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pool_relu` of batch norm of x + shift by PyTorch operators, with the batch's
    statistics."""
    y, mean, var = batch_norm_train(x, shift, weight, bias, eps)
    return pool_relu(y), mean, var


def _nhwc(x: Tensor) -> Tensor:
    """x [B, C, H, W] with its bytes in NHWC order (what the native kernels read and write)."""
    return x.contiguous(memory_format=torch.channels_last)


def _pooled(x: Tensor, channels: int) -> Tensor:
    """An empty channels-last [B, channels, H/2, W/2] tensor for x [B, ·, H, W]: a block's
    pooled output, or its windows' extremes."""
    b, _, h, w = x.shape
    return torch.empty((b, channels, h // 2, w // 2), memory_format=torch.channels_last)


class _NativeTail(torch.autograd.Function):
    """:func:`_reference_tail` in ``learner_block.cpp``: one pass over x forward (the statistics,
    and each window's input at its maximum: the extremes, a quarter of x, kept for the
    backward) then one over the extremes; back, one over the extremes (the sums) and one over x.

    Its backward is native; under ``create_graph`` (second-order MAML) it differentiates the
    PyTorch composition instead, recomputed from the saved inputs, so higher derivatives exist.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
    ) -> Any:
        mean, var = x.new_empty(x.shape[1]), x.new_empty(x.shape[1])
        extremes = _pooled(x, x.shape[1])
        out = _native_forward(x, weight, bias, eps, mean, var, extremes)
        ctx.save_for_backward(x, shift, weight, bias, mean, var, extremes)
        ctx.eps = eps
        return out, *_graph_constants(ctx, mean + shift, var)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, _d_mean: Tensor, _d_var: Tensor) -> Any:
        x, shift, weight, bias, mean, var, extremes = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: through the PyTorch composition
            grads = _composition_backward(
                lambda: _reference_tail(x, shift, weight, bias, ctx.eps)[0],
                (x, shift, weight, bias),
                ctx.needs_input_grad[:4],
                d_out,
            )
            return (*grads, None)
        d_x, d_weight, d_bias = _native_backward(
            x, extremes, d_out, weight, bias, ctx.eps, mean, var
        )
        return d_x, torch.zeros_like(d_bias), d_weight, d_bias, None


def _composition_backward(
    composition: Callable[[], Tensor],
    inputs: tuple[Tensor, ...],
    needs: tuple[bool, ...],
    d_out: Tensor,
) -> list[Tensor | None]:
    """The gradients of ``composition()`` (the PyTorch operators a native tail replaces,
    recomputed) w.r.t. the ``inputs`` that ``needs`` them, with their own graph: a native tail's
    backward under ``create_graph``, so that higher derivatives exist."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(composition(), wanted, d_out, create_graph=True))
    return [next(grads) if need else None for need in needs]


def _native_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    mean: Tensor,
    var: Tensor,
    extremes: Tensor | None,
) -> Tensor:
    """``metalstm_block_forward``: the pooled output [B, C, H/2, W/2] (channels-last). With
    ``extremes`` (pooled-size, channels-last) the statistics are the batch's, written to ``mean``
    and ``var``, and each window's input at its maximum to ``extremes`` (what the backward
    reads); without, they are read from ``mean`` and ``var``."""
    x_nhwc = _nhwc(x)  # x itself when it is channels-last already (the learner's blocks)
    b, c, h, w = x.shape
    out = _pooled(x, c)
    weight_c, bias_c = weight.detach().contiguous(), bias.detach().contiguous()
    mean, var = mean.detach().contiguous(), var.detach().contiguous()
    native.library(BLOCK_SOURCE).metalstm_block_forward(
        b, h, w, c, torch.get_num_threads(),
        x_nhwc.data_ptr(), weight_c.data_ptr(), bias_c.data_ptr(), eps,
        out.data_ptr(), mean.data_ptr(), var.data_ptr(),
        native.pointer(extremes),
    )  # fmt: skip
    return out


def _native_backward(
    x: Tensor,
    extremes: Tensor | None,
    d_out: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    mean: Tensor,
    var: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``metalstm_block_backward``: ∂x (channels-last), ∂γ and ∂β [C], through the batch's
    statistics with the forward's ``extremes``, or with ``mean`` and ``var`` given (None)."""
    b, c, h, w = x.shape
    x, d_out = _nhwc(x), _nhwc(d_out)
    d_x = torch.empty_like(x, memory_format=torch.channels_last)
    d_weight, d_bias = x.new_empty(c), x.new_empty(c)
    weight_c, bias_c = weight.detach().contiguous(), bias.detach().contiguous()
    mean, var = mean.detach().contiguous(), var.detach().contiguous()
    native.library(BLOCK_SOURCE).metalstm_block_backward(
        b, h, w, c, torch.get_num_threads(),
        x.data_ptr(), native.pointer(extremes), d_out.data_ptr(),
        weight_c.data_ptr(), bias_c.data_ptr(), mean.data_ptr(), var.data_ptr(), eps,
        d_x.data_ptr(), d_weight.data_ptr(), d_bias.data_ptr(),
    )  # fmt: skip
    return d_x, d_weight, d_bias


def batch_norm_pool_relu(
    x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU(max-pool 2x2(:func:`batch_norm_train` of x + shift)): a learner block's tail with the
    batch's statistics, x [B, C, H, W] → [B, C, H/2, W/2], and the batch's mean and biased
    variance [C] for :func:`update_running_stats`.

    Float32 CPU tensors take the native kernels (``learner_block.cpp``) when they are available,
    others the PyTorch operators; tests compare both (tests/test_speed_paths.py).
    """
    if x.numel() // x.shape[1] < 2:
        raise ValueError(f"batch norm needs more than 1 value per channel, got shape {x.shape}")
    fits = _native_channels(x.shape[1]) and min(x.shape[2:]) >= 2
    if fits and native.applies(x, shift, weight, bias) and native.available(BLOCK_SOURCE):
        return _NativeTail.apply(x, shift, weight, bias, eps)
    return _reference_tail(x, shift, weight, bias, eps)


def _reference_given_tail(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> Tensor:
    """:func:`pool_relu` of batch norm of x with the given statistics, by PyTorch operators."""
    return pool_relu(F.batch_norm(x, mean, var, weight, bias, eps=eps))


class _NativeGivenTail(torch.autograd.Function):
    """:func:`_reference_given_tail` in ``learner_block.cpp``: one pass over x each way.

    The statistics are constants (no gradient). Under ``create_graph`` the backward differentiates
    the PyTorch composition, as :class:`_NativeTail` does.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float
    ) -> Tensor:
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.eps = eps
        return _native_forward(x, weight, bias, eps, mean, var, None)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> Any:
        x, mean, var, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: through the PyTorch composition
            d_x, d_weight, d_bias = _composition_backward(
                lambda: _reference_given_tail(x, mean, var, weight, bias, ctx.eps),
                (x, weight, bias),
                (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:5]),
                d_out,
            )
        else:
            d_x, d_weight, d_bias = _native_backward(
                x, None, d_out, weight, bias, ctx.eps, mean, var
            )
        return d_x, None, None, d_weight, d_bias, None


def normalise_pool_relu(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> Tensor:
    """ReLU(max-pool 2x2(batch norm of x with the given statistics ``mean``, ``var`` [C]: running
    ones)): a learner block's tail at evaluation and in fine-tuning, x [B, C, H, W] →
    [B, C, H/2, W/2]. Statistics that require a gradient take the PyTorch operators.

    Float32 CPU tensors take the native kernels when they are available (one pass over x instead
    of three forward, and no zero-filled max-pool gradient back), others the PyTorch operators;
    tests compare both (tests/test_speed_paths.py).
    """
    fits = _native_channels(x.shape[1]) and min(x.shape[2:]) >= 2
    constants = not (mean.requires_grad or var.requires_grad)
    tensors = (x, mean, var, weight, bias)
    if fits and constants and native.applies(*tensors) and native.available(BLOCK_SOURCE):
        return _NativeGivenTail.apply(x, mean, var, weight, bias, eps)
    return _reference_given_tail(x, mean, var, weight, bias, eps)


def batch_norm_relu(
    x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU(:func:`batch_norm_train` of x + shift): the tail of a block without max-pool (a
    strided convolution downsamples instead), with the batch's mean and biased variance [C]."""
    y, mean, var = batch_norm_train(x, shift, weight, bias, eps)
    return F.relu(y), mean, var


def normalise_relu(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> Tensor:
    """ReLU(batch norm of x with the given statistics): :func:`batch_norm_relu` at evaluation."""
    return F.relu(F.batch_norm(x, mean, var, weight, bias, eps=eps))


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """r ← (1 − momentum) · r + momentum · batch, in place, with the unbiased batch variance
    (``count`` values per channel), as ``F.batch_norm`` does."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)


# -- the 3x3 convolution ------------------------------------------------------------------------


def _conv3x3_arguments(stride: int, groups: int) -> tuple[Any, ...]:
    """``aten.convolution_backward``'s stride, padding, dilation, transposed, output padding and
    groups for a 3x3 convolution with padding 1."""
    return [stride, stride], [1, 1], [1, 1], False, [0, 0], groups


CONV_SOURCE = native.NativeSource(
    Path(__file__).with_name("learner_conv.cpp"),
    constants=(("metalstm_conv_abi", 1),),
    functions=(("metalstm_conv3x3_weight_grad", (*(ctypes.c_long,) * 9, ctypes.c_int, *[_P] * 3)),),
)


def conv_kernels(device: torch.device | None = None, filters: int | None = None) -> str:
    """Which kernel computes the learner convolutions' weight gradient on float32 tensors (on
    ``device`` with ``filters`` output channels per episode, when given) here, in words."""
    if device is not None and device.type != "cpu":
        return "eager"
    if filters is not None and filters not in _NATIVE_FILTERS:
        return "eager (one thread)"
    return native.status(CONV_SOURCE, "native (C++, every thread, fixed order)")


_NATIVE_FILTERS = (16, 32, 64)  # output channels per group the native weight gradient takes


def _native_weight_gradient(x: Tensor, d_y: Tensor, weight: Tensor, stride: int) -> Tensor | None:
    """``metalstm_conv3x3_weight_grad``: ∂W [G·C_out, C_in, 3, 3] of a 3x3 convolution of x
    [B, G·C_in, H, W] with padding 1, for ∂y; None where the native kernel does not apply
    (float32 CPU tensors, 16, 32 or 64 output channels per group, and a C++ compiler)."""
    groups = x.shape[1] // weight.shape[1]
    if (
        not native.applies(x, d_y, weight)
        or weight.shape[0] // groups not in _NATIVE_FILTERS
        or not native.available(CONV_SOURCE)
    ):
        return None
    x_nhwc, d_y_nhwc = _nhwc(x), _nhwc(d_y)  # no copy for the learner's channels-last tensors
    b, _, h, w = x.shape
    d_weight = torch.empty(weight.shape)
    native.library(CONV_SOURCE).metalstm_conv3x3_weight_grad(
        b, h, w, weight.shape[1], d_y.shape[2], d_y.shape[3], weight.shape[0] // groups, groups,
        stride, torch.get_num_threads(), x_nhwc.data_ptr(), d_y_nhwc.data_ptr(),
        d_weight.data_ptr(),
    )  # fmt: skip
    return d_weight


class _Conv3x3(torch.autograd.Function):
    """3x3 convolution, padding 1, no bias, in ``groups`` groups; the weight gradient in an
    order that does not depend on the thread count: natively on every thread, else (and under
    ``create_graph``, which differentiates it) oneDNN's on one thread."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, stride: int, groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.groups = stride, groups
        return torch.nn.functional.conv2d(x, weight, stride=stride, padding=1, groups=groups)

    @staticmethod
    def backward(ctx: Any, d_y: Tensor) -> Any:
        x, weight = ctx.saved_tensors
        need_x, need_weight, _, _ = ctx.needs_input_grad
        backward = torch.ops.aten.convolution_backward
        arguments = _conv3x3_arguments(ctx.stride, ctx.groups)
        d_x = d_weight = None
        if need_x:
            d_x = backward(d_y, x, weight, None, *arguments, [True, False, False])[0]
        if need_weight and not torch.is_grad_enabled():
            d_weight = _native_weight_gradient(x, d_y, weight, ctx.stride)
        if need_weight and d_weight is None:
            with single_threaded(x.device):
                d_weight = backward(d_y, x, weight, None, *arguments, [False, True, False])[1]
        return d_x, d_weight, None, None


def conv3x3(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=1, groups=G)`` for x [B, G·C_in, H, W],
    weight [G·C_out, C_in, 3, 3] → [B, G·C_out, ⌈H/stride⌉, ⌈W/stride⌉], whose weight gradient
    does not depend on the thread count (differentiable twice). G = 1 but for a batch of
    episodes, each its own group (:mod:`metalstm.learner`)."""
    groups = x.shape[1] // weight.shape[1]
    return _Conv3x3.apply(x, weight, stride, groups)


# -- a whole block: 3x3 convolution, batch norm, ReLU and down-sampling --------------------------


#: Input channels per group up to which a pooled block's convolution runs inside its native
#: kernels (:func:`conv_batch_norm_pool_relu`, :func:`conv_normalise_pool_relu`): a first
#: block's, on an image's 1 or 3.
FUSED_CONV_INPUTS = 4


def fuses_conv(x: Tensor, conv_weight: Tensor, *params: Tensor, batch_stats: bool) -> bool:
    """Whether a pooled block's convolution of x by ``conv_weight`` runs inside its native tail
    here (``params``: the tail's other tensors): at most :data:`FUSED_CONV_INPUTS` input channels
    per group (a first block) and a multiple of 16 filters per group (up to 512 in all), float32
    CPU tensors, a C++ compiler whose build of the fused block pays here (:func:`_fusion_pays`),
    and x without a gradient (images); with given statistics (``batch_stats`` false:
    evaluation), no tensor needing one."""
    groups = x.shape[1] // conv_weight.shape[1]
    filters = conv_weight.shape[0]
    tensors = (x, conv_weight, *params)
    differentiated = tensors if not batch_stats else (x,)
    return (
        conv_weight.shape[1] <= FUSED_CONV_INPUTS
        and _native_channels(filters)
        and (filters // groups) % 16 == 0
        and min(x.shape[2:]) >= 2
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in differentiated))
        and native.applies(*tensors)
        and native.available(BLOCK_SOURCE)
        and _fusion_pays()
    )


@cache
def _fusion_pays() -> bool:
    """Whether this CPU's build of ``learner_block.cpp`` runs a first block faster with its
    convolution fused than apart (``metalstm_block_fuses_conv``: on AVX-512, not on AVX2, where
    the fused block took 3-27 times as long)."""
    fuses = native.library(BLOCK_SOURCE).metalstm_block_fuses_conv
    fuses.restype = ctypes.c_long
    return bool(fuses())


def _conv_channels_last(x: Tensor, conv_weight: Tensor, stride: int = 1) -> Tensor:
    """:func:`conv3x3`, its output in NHWC memory order on the CPU (where the next convolution,
    the native tails and max-pool run much faster)."""
    y = conv3x3(x, conv_weight, stride)
    return y.contiguous(memory_format=torch.channels_last) if y.device.type == "cpu" else y


def _native_conv_forward(
    x: Tensor,
    conv_weight: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    mean: Tensor,
    var: Tensor,
    extremes: Tensor | None,
) -> Tensor:
    """``metalstm_conv_block_forward``: the pooled output [B, G·C_out, H/2, W/2] (channels-last)
    of the block whose convolution is fused. With ``extremes`` (a pooled-size channels-last
    tensor) the statistics are the batch's, written to ``mean`` and ``var``, and each window's
    convolution output at its maximum to ``extremes`` (what the backward reads); without, they
    are read from ``mean`` and ``var``."""
    b, _, h, w = x.shape
    filters, inputs = conv_weight.shape[:2]
    out = _pooled(x, filters)
    x_nhwc, kernel = _nhwc(x).detach(), conv_weight.detach().contiguous()
    weight_c, bias_c = weight.detach().contiguous(), bias.detach().contiguous()
    native.library(BLOCK_SOURCE).metalstm_conv_block_forward(
        b, h, w, inputs, filters, x.shape[1] // inputs, torch.get_num_threads(),
        x_nhwc.data_ptr(), kernel.data_ptr(), weight_c.data_ptr(), bias_c.data_ptr(), eps,
        out.data_ptr(), mean.data_ptr(), var.data_ptr(),
        native.pointer(extremes),
    )  # fmt: skip
    return out


def _reference_conv_tail(
    x: Tensor, conv_weight: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> Tensor:
    """:func:`_reference_tail` of :func:`conv3x3` (x, ``conv_weight``) by PyTorch operators."""
    return _reference_tail(conv3x3(x, conv_weight), shift, weight, bias, eps)[0]


class _NativeConvTail(torch.autograd.Function):
    """:func:`_reference_conv_tail` in ``learner_block.cpp``, the convolution fused: computed
    once forward and once back rather than written out (the forward keeps each window's output
    at its maximum, a pooled-size tensor, for the backward's sums), the backward giving its
    weight's gradient instead of the convolution output's. Under ``create_graph`` the backward
    differentiates the PyTorch composition, as :class:`_NativeTail` does."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        conv_weight: Tensor,
        shift: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: float,
    ) -> Any:
        mean, var = x.new_empty(conv_weight.shape[0]), x.new_empty(conv_weight.shape[0])
        extremes = _pooled(x, conv_weight.shape[0])
        out = _native_conv_forward(x, conv_weight, weight, bias, eps, mean, var, extremes)
        ctx.save_for_backward(x, conv_weight, shift, weight, bias, mean, var, extremes)
        ctx.eps = eps
        return out, *_graph_constants(ctx, mean + shift, var)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, _d_mean: Tensor, _d_var: Tensor) -> Any:
        x, conv_weight, shift, weight, bias, mean, var, extremes = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: through the PyTorch composition
            grads = _composition_backward(
                lambda: _reference_conv_tail(x, conv_weight, shift, weight, bias, ctx.eps),
                (x, conv_weight, shift, weight, bias),
                ctx.needs_input_grad[:5],
                d_out,
            )
            return (*grads, None)
        b, _, h, w = x.shape
        filters, inputs = conv_weight.shape[:2]
        d_conv = torch.empty(conv_weight.shape)
        d_weight, d_bias = x.new_empty(filters), x.new_empty(filters)
        x_nhwc, kernel, d_out = _nhwc(x), conv_weight.contiguous(), _nhwc(d_out)
        native.library(BLOCK_SOURCE).metalstm_conv_block_backward(
            b, h, w, inputs, filters, x.shape[1] // inputs, torch.get_num_threads(),
            x_nhwc.data_ptr(), kernel.data_ptr(), extremes.data_ptr(), d_out.data_ptr(),
            weight.contiguous().data_ptr(), bias.contiguous().data_ptr(), mean.data_ptr(),
            var.data_ptr(), ctx.eps,
            d_conv.data_ptr(), d_weight.data_ptr(), d_bias.data_ptr(),
        )  # fmt: skip
        return None, d_conv, torch.zeros_like(d_bias), d_weight, d_bias, None


def conv_batch_norm_pool_relu(
    x: Tensor, conv_weight: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm_pool_relu` of :func:`conv3x3` (x, ``conv_weight``): a pooled learner
    block with the batch's statistics, x [B, G·C_in, H, W] → [B, G·C_out, H/2, W/2], and the
    batch's mean and biased variance [G·C_out].

    Where :func:`fuses_conv` holds (a first block: an image's few channels in), the convolution
    runs inside the native kernels, computed once forward and once back rather than written: at
    84x84 its output for 75 query images is 68 MB, which oneDNN wrote and the tail read twice
    forward, twice back, writing its gradient for the weight gradient to read. The same
    mathematics (tests compare); float32 rounding differs in the last bits.
    """
    if fuses_conv(x, conv_weight, shift, weight, bias, batch_stats=True):
        return _NativeConvTail.apply(x, conv_weight, shift, weight, bias, eps)
    return batch_norm_pool_relu(_conv_channels_last(x, conv_weight), shift, weight, bias, eps)


def conv_normalise_pool_relu(
    x: Tensor,
    conv_weight: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
) -> Tensor:
    """:func:`normalise_pool_relu` of :func:`conv3x3` (x, ``conv_weight``): a pooled learner
    block with given statistics (evaluation), x [B, G·C_in, H, W] → [B, G·C_out, H/2, W/2].
    Where :func:`fuses_conv` holds, in one native pass: at evaluation of an Omniglot episode the
    query pass no longer writes the first convolution's 15 MB output and reads it back."""
    given = (mean, var, weight, bias)
    if fuses_conv(x, conv_weight, *given, batch_stats=False):
        mean_c, var_c = mean.detach().contiguous(), var.detach().contiguous()
        return _native_conv_forward(x, conv_weight, weight, bias, eps, mean_c, var_c, None)
    return normalise_pool_relu(_conv_channels_last(x, conv_weight), *given, eps)


def conv_batch_norm_relu(
    x: Tensor, conv_weight: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm_relu` of a stride-2 :func:`conv3x3` (x, ``conv_weight``): a strided
    learner block with the batch's statistics (Finn et al.'s)."""
    return batch_norm_relu(_conv_channels_last(x, conv_weight, 2), shift, weight, bias, eps)


def conv_normalise_relu(
    x: Tensor,
    conv_weight: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
) -> Tensor:
    """:func:`normalise_relu` of a stride-2 :func:`conv3x3` (x, ``conv_weight``): a strided
    learner block with given statistics."""
    return normalise_relu(_conv_channels_last(x, conv_weight, 2), mean, var, weight, bias, eps)
