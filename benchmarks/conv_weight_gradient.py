"""The learner convolutions' weight gradient: the native kernel against oneDNN's, called alone.

Usage::

    python benchmarks/conv_weight_gradient.py [--repeats 20] [--threads 2]

For the 3x3 convolutions of the throughput workloads (84x84 RGB and 28x28 Omniglot images, the
support set's and the 75-image query pass's batches, 32 or 64 filters; one episode, and eight
as the groups of one pass, as meta-batches of 8 run them), prints one Markdown
table of milliseconds per call: oneDNN's weight gradient on one thread (what ``conv3x3`` runs
without the native kernel, so that its sum does not depend on the thread count), oneDNN's on
every thread (thread-dependent rounding: not used, shown as the rate the hardware allows), and
``learner_conv.cpp`` on every thread, with its GFLOP/s, its largest difference to float64's
result (relative to the largest value; oneDNN's beside it) and whether 1, 2 and 3 threads give
the same bits. The last line names the CPU: timings compare only within one run.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from grouped_conv import kernel_arguments, median_ms
from metalstm import layers
from metalstm.machine import cpu_name

# (label, images, C_in, side, C_out per group, groups)
SHAPES = [
    ("84x84 RGB, layer 1, 25 support images", 25, 3, 84, 32, 1),
    ("84x84 RGB, layer 2, 25 support images", 25, 32, 42, 32, 1),
    ("84x84 RGB, layer 1, 75 query images", 75, 3, 84, 32, 1),
    ("84x84 RGB, layer 2, 75 query images", 75, 32, 42, 32, 1),
    ("84x84 RGB, layer 3, 75 query images", 75, 32, 21, 32, 1),
    ("28x28 Omniglot, layer 1, 5 support images", 5, 1, 28, 64, 1),
    ("28x28 Omniglot, layer 2, 5 support images", 5, 64, 14, 64, 1),
    ("28x28 Omniglot, layer 3, 5 support images", 5, 64, 7, 64, 1),
    ("28x28 Omniglot, layer 4, 5 support images", 5, 64, 3, 64, 1),
    ("28x28 Omniglot, layer 1, 75 query images", 75, 1, 28, 64, 1),
    ("28x28 Omniglot, layer 2, 75 query images", 75, 64, 14, 64, 1),
    ("84x84 RGB, layer 2, 8 episodes' 5 support images", 5, 32, 42, 32, 8),
    ("84x84 RGB, layer 2, 8 episodes' 75 query images", 75, 32, 42, 32, 8),
    ("28x28, 32 filters, layer 2, 8 episodes' 5 support images", 5, 32, 14, 32, 8),
    ("28x28, 32 filters, layer 2, 8 episodes' 75 query images", 75, 32, 14, 32, 8),
]


def onednn(x: Tensor, weight: Tensor, d_y: Tensor) -> Tensor:
    """oneDNN's weight gradient (``aten.convolution_backward``, stride 1, padding 1)."""
    groups = x.shape[1] // weight.shape[1]
    arguments = ([1, 1], [1, 1], [1, 1], False, [0, 0], groups, [False, True, False])
    return torch.ops.aten.convolution_backward(d_y, x, weight, None, *arguments)[1]


def native(x: Tensor, weight: Tensor, d_y: Tensor) -> Tensor:
    d_weight = layers._native_weight_gradient(x, d_y, weight, 1)
    assert d_weight is not None, layers.conv_kernels()
    return d_weight


def relative_error(got: Tensor, exact: Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


def main() -> None:
    args = kernel_arguments(__doc__)
    print(f"kernel: {layers.conv_kernels()}\n")
    print(
        f"| convolution | oneDNN, 1 thread | oneDNN, {args.threads} threads | native, "
        f"{args.threads} threads | native GFLOP/s | error: native / oneDNN | same bits, 1-3 "
        "threads |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for label, images, c_in, side, c_out, groups in SHAPES:
        x = torch.randn(images, groups * c_in, side, side, generator=generator)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(groups * c_out, c_in, 3, 3, generator=generator)
        d_y = torch.randn(images, groups * c_out, side, side, generator=generator)
        d_y = d_y.contiguous(memory_format=torch.channels_last)
        theirs, mine = partial(onednn, x, weight, d_y), partial(native, x, weight, d_y)
        with layers.single_threaded(x.device):
            one = median_ms(theirs, args.repeats)
        every = median_ms(theirs, args.repeats)
        ours = median_ms(mine, args.repeats)
        exact = onednn(x.double(), weight.double(), d_y.double())
        errors = (
            relative_error(native(x, weight, d_y), exact),
            relative_error(onednn(x, weight, d_y), exact),
        )
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(native(x, weight, d_y))
        torch.set_num_threads(args.threads)
        same = all(torch.equal(results[0], r) for r in results[1:])
        gflops = 2 * images * side * side * 9 * c_in * c_out * groups / ours / 1e6
        print(
            f"| {label} | {one:.2f} | {every:.2f} | {ours:.2f} | {gflops:.0f} | "
            f"{errors[0]:.1e} / {errors[1]:.1e} | {'yes' if same else 'NO'} |"
        )
    print(f"\nmachine: {cpu_name()}, {args.threads} threads")


if __name__ == "__main__":
    main()
