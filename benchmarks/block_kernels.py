"""The learner blocks' batch norm, 2x2 max-pool and ReLU: the native kernels against PyTorch's.

Usage::

    python benchmarks/block_kernels.py [--repeats 20] [--threads 2]

For the blocks of the throughput workloads (84x84 RGB and 28x28 Omniglot images, the support
set's and the 75-image query pass's batches, 32 or 64 filters), prints one Markdown table of
milliseconds per call, forward and backward, with the batch's statistics (support passes) and
with given ones (the query pass; evaluation): ``learner_block.cpp`` (``layers._NativeTail``,
``layers._NativeGivenTail``) against the PyTorch composition it replaces, both on every thread,
and the memory the native kernels read and write per call at the rate they reach (x twice each
way with the batch's statistics, once with given ones; the pooled tensors a quarter of x).
Then a first block whole, its convolution included (1 or 3 input channels, 32 or 64 filters,
one episode or 8 at once as groups): the native kernels with the convolution fused
(``layers.conv_batch_norm_pool_relu`` and ``conv_normalise_pool_relu``, FirstConv) against the
convolution (oneDNN, and the native weight gradient) then the native tail, what ran before.
The last line names the CPU: timings compare only within one run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grouped_conv import kernel_arguments, median_ms
from metalstm import layers
from metalstm.learner import to_channels_last
from metalstm.machine import cpu_name

EPS = 1e-5

# (label, images, channels, side)
SHAPES = [
    ("84x84 RGB, layer 1, 25 support images", 25, 32, 84),
    ("84x84 RGB, layer 2, 25 support images", 25, 32, 42),
    ("84x84 RGB, layer 1, 75 query images", 75, 32, 84),
    ("28x28 Omniglot, layer 1, 5 support images", 5, 64, 28),
    ("28x28 Omniglot, layer 1, 75 query images", 75, 64, 28),
]


def timed_pair(
    forward: Callable[[Tensor], Tensor], x: Tensor, params: tuple[Tensor, ...], repeats: int
) -> tuple[float, float]:
    """Milliseconds of ``forward(x)``, and of its backward into x and ``params`` alone (one
    forward's graph, kept; the gradients returned, not accumulated into ``.grad``, which would
    be another pass over x's size)."""
    x = x.detach().requires_grad_()
    out = forward(x)
    d_out = torch.randn_like(out)
    forward_ms = median_ms(lambda: forward(x), repeats)
    inputs = (x, *params)
    backward_ms = median_ms(
        lambda: torch.autograd.grad(out, inputs, d_out, retain_graph=True), repeats
    )
    return forward_ms, backward_ms


def row(label: str, images: int, channels: int, side: int, repeats: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(images, channels, side, side, generator=generator)
    x = (3.0 * x + 0.5).contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(channels, generator=generator) + 0.5).requires_grad_()
    bias = (0.1 * torch.randn(channels, generator=generator)).requires_grad_()
    shift = torch.zeros(channels)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))

    def native_batch(x: Tensor) -> Tensor:
        return layers.batch_norm_pool_relu(x, shift, weight, bias, EPS)[0]

    def eager_batch(x: Tensor) -> Tensor:
        return layers._reference_tail(x, shift, weight, bias, EPS)[0]

    def native_given(x: Tensor) -> Tensor:
        return layers.normalise_pool_relu(x, mean, var, weight, bias, EPS)

    def eager_given(x: Tensor) -> Tensor:
        return layers._reference_given_tail(x, mean, var, weight, bias, EPS)

    mb = x.numel() * 4 / 1e6
    lines = []
    for kind, native, eager, passes in (
        ("batch statistics", native_batch, eager_batch, (2.25, 3.25)),
        ("given statistics", native_given, eager_given, (1.25, 2.25)),
    ):
        ours = timed_pair(native, x, (weight, bias), repeats)
        theirs = timed_pair(eager, x, (weight, bias), repeats)
        rates = [passes[k] * mb / ours[k] for k in (0, 1)]  # MB / ms = GB/s
        lines.append(
            f"| {label}, {kind} | {theirs[0]:.2f} / {theirs[1]:.2f} | {ours[0]:.2f} / {ours[1]:.2f}"
            f" | {rates[0]:.0f} / {rates[1]:.0f} |"
        )
    return lines


# (label, images, input channels, filters, side, episodes as groups)
FIRST_BLOCKS = [
    ("84x84 RGB, 5 support images", 5, 3, 32, 84, 1),
    ("84x84 RGB, 25 support images", 25, 3, 32, 84, 1),
    ("84x84 RGB, 75 query images", 75, 3, 32, 84, 1),
    ("28x28 gray, 5 support images", 5, 1, 32, 28, 1),
    ("28x28 gray, 75 query images", 75, 1, 32, 28, 1),
    ("28x28 gray, 5 support images, 8 episodes", 5, 1, 32, 28, 8),
    ("28x28 gray, 75 query images, 8 episodes", 75, 1, 32, 28, 8),
    ("28x28 RGB, 5 support images, 8 episodes", 5, 3, 32, 28, 8),
    ("84x84 RGB, 5 support images, 8 episodes", 5, 3, 32, 84, 8),
    ("Omniglot evaluation, 5 support images, 64 filters", 5, 1, 64, 28, 1),
    ("Omniglot evaluation, 75 query images, 64 filters", 75, 1, 64, 28, 1),
]


def first_block_row(
    label: str, images: int, inputs: int, filters: int, side: int, groups: int, repeats: int
) -> str:
    """Milliseconds of a first block with the batch's statistics, forward and backward (into the
    conv weight, γ and β), and of its forward with given statistics: the convolution then the
    native tail, and fused."""
    generator = torch.Generator().manual_seed(0)
    channels = groups * filters
    x = to_channels_last(torch.rand(images, groups * inputs, side, side, generator=generator))
    conv = (torch.randn(channels, inputs, 3, 3, generator=generator) / 3).requires_grad_()
    weight = (torch.rand(channels, generator=generator) + 0.5).requires_grad_()
    bias = (0.1 * torch.randn(channels, generator=generator)).requires_grad_()
    shift = torch.zeros(channels)
    mean, var = torch.zeros(channels), torch.ones(channels)
    # the fused kernel timed on every build, also where the learner runs the two steps (AVX2)
    layers._fusion_pays = lambda: True  # type: ignore[assignment]
    assert layers.fuses_conv(x, conv, shift, weight, bias, batch_stats=True)

    def two_step(x: Tensor) -> Tensor:
        return layers.batch_norm_pool_relu(
            layers._conv_channels_last(x, conv), shift, weight, bias, EPS
        )[0]

    def two_step_given(x: Tensor) -> Tensor:
        y = layers._conv_channels_last(x, conv)
        return layers.normalise_pool_relu(y, mean, var, weight, bias, EPS)

    def fused(x: Tensor) -> Tensor:
        return layers._NativeConvTail.apply(x, conv, shift, weight, bias, EPS)[0]

    def fused_given(x: Tensor) -> Tensor:
        return layers.conv_normalise_pool_relu(x, conv, mean, var, weight, bias, EPS)

    cells = [
        timed_block(batch, given, x, (conv, weight, bias), repeats)
        for batch, given in ((two_step, two_step_given), (fused, fused_given))
    ]
    return f"| {label} | {cells[0]} | {cells[1]} |"


def timed_block(
    batch: Callable[[Tensor], Tensor],
    given: Callable[[Tensor], Tensor],
    x: Tensor,
    params: tuple[Tensor, ...],
    repeats: int,
) -> str:
    """ "forward / backward / forward with given statistics" in milliseconds."""
    out = batch(x)
    d_out = torch.randn_like(out)
    forward = median_ms(lambda: batch(x), repeats)
    backward = median_ms(
        lambda: torch.autograd.grad(out, params, d_out, retain_graph=True), repeats
    )
    with torch.no_grad():
        evaluation = median_ms(lambda: given(x), repeats)
    return f"{forward:.2f} / {backward:.2f} / {evaluation:.2f}"


def main() -> None:
    args = kernel_arguments(__doc__)
    print(f"kernels: {layers.block_kernels()}\n")
    print(
        "| block | PyTorch: forward / backward (ms) | native: forward / backward (ms) | native: "
        "GB/s read and written, forward / backward |"
    )
    print("| --- | --- | --- | --- |")
    for label, images, channels, side in SHAPES:
        for line in row(label, images, channels, side, args.repeats):
            print(line)
    print(
        "\n| first block, convolution included | convolution then native tail: forward / "
        "backward / forward with given statistics (ms) | convolution fused: the same (ms) |"
    )
    print("| --- | --- | --- |")
    for shape in FIRST_BLOCKS:
        print(first_block_row(*shape, args.repeats))
    print(f"\nmachine: {cpu_name()}, {args.threads} threads")


if __name__ == "__main__":
    main()
