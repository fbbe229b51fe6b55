"""The learner's layers, computed so that a run does not depend on the CPU's thread count.

A meta-training run is a chaotic process: the learner is piecewise linear (ReLU, max-pool) on a
handful of support images, so a difference in the last bit of one activation can flip a ReLU or a
max-pool choice a few inner steps later, and Adam turns the changed meta-gradient into a different
step. Float rounding that depends on the number of threads therefore sends runs with 1 and 2
threads down different paths within a few updates. Two PyTorch CPU kernels did that here:

- batch norm on channels-last tensors accumulates its statistics in float32 in a thread-dependent
  order, with errors up to 1e-4 relative on 28x28 Omniglot batches and 1e-3 at 84x84 (its weight
  gradient 1e-2): :func:`batch_norm_train` computes them in two passes with ATen's cascade sums
  instead (about 1e-7, the same bits for any thread count);
- oneDNN's convolution weight gradient sums over the batch in a thread-dependent order:
  :func:`conv3x3` computes it on one thread (the input gradient, the larger part, keeps all).

:func:`single_threaded` is the context that weight gradient, and the meta-learner's long
reductions over the n coordinates, run in. See README "Reproducibility" for what holds where.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


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


# -- batch norm with the batch's own statistics ---------------------------------------------------


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean [C], biased variance [C] and centred values [B, C, H, W] of x, in two
    passes (sum, then the sum of squares about the mean)."""
    count = x.numel() // x.shape[1]
    mean = x.sum((0, 2, 3)) / count
    centred = x - mean.view(1, -1, 1, 1)
    return mean, centred.square().sum((0, 2, 3)) / count, centred


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
        shifted_mean = mean + shift
        ctx.mark_non_differentiable(shifted_mean, var)
        return y, shifted_mean, var

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


_CONV3X3 = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, ..., groups


class _Conv3x3(torch.autograd.Function):
    """3x3 convolution, stride 1, padding 1, no bias; the weight gradient on one thread."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx: Any, d_y: Tensor) -> Any:
        x, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad
        backward = torch.ops.aten.convolution_backward
        d_x = d_weight = None
        if need_x:
            d_x = backward(d_y, x, weight, None, *_CONV3X3, [True, False, False])[0]
        if need_weight:
            with single_threaded(x.device):
                d_weight = backward(d_y, x, weight, None, *_CONV3X3, [False, True, False])[1]
        return d_x, d_weight


def conv3x3(x: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(x, weight, padding=1)`` for x [B, C_in, H, W], weight [C_out, C_in, 3, 3],
    whose weight gradient does not depend on the thread count (differentiable twice)."""
    return _Conv3x3.apply(x, weight)
