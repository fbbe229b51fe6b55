"""The learner blocks' batch norm, 2x2 max-pool and ReLU: the native kernels against PyTorch's.

Usage::

    python benchmarks/block_kernels.py [--repeats 20] [--threads 2]

For the blocks of the throughput workloads (84x84 RGB and 28x28 Omniglot images, the support
set's and the 75-image query pass's batches, 32 or 64 filters), prints one Markdown table of
milliseconds per call, forward and backward, with the batch's statistics (support passes) and
with given ones (the query pass; evaluation): ``learner_block.cpp`` (``layers._NativeTail``,
``layers._NativeGivenTail``) against the PyTorch composition it replaces, both on every thread,
and the memory the native kernels read and write per call at the rate they reach (x twice each
way with the batch's statistics, once with given ones; the pooled tensors a quarter of x). The
last line names the CPU: timings compare only within one run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grouped_conv import kernel_arguments, median_ms
from metalstm import layers
from metalstm.bench import cpu_name

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
    print(f"\nmachine: {cpu_name()}, {args.threads} threads")


if __name__ == "__main__":
    main()
