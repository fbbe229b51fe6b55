"""A batch of E episodes' convolutions as one grouped convolution against E ungrouped ones.

Usage::

    python benchmarks/grouped_conv.py [--episodes 8] [--repeats 10]

For the learner's layer shapes (images per episode B, input channels C, side H, filters), times
the forward, the weight gradient (on one thread, as ``metalstm.layers.conv3x3`` computes it) and
the input gradient of E episodes: as E calls on [B, C, H, H] (one episode at a time) and as one
call on [B, E·C, H, H] with E groups (``Config.episode_batch``), channels-last, milliseconds per
E episodes (median of the repeats). Prints one Markdown table and the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from metalstm.allocator import keep_freed_memory
from metalstm.layers import single_threaded
from metalstm.machine import cpu_name

SHAPES = [  # (images per episode, input channels, side, filters)
    (25, 3, 84, 32), (25, 32, 42, 32), (25, 32, 21, 32), (25, 32, 10, 32),
    (5, 3, 84, 32), (5, 1, 28, 32), (5, 32, 14, 32), (5, 1, 28, 64), (5, 64, 14, 64),
    (75, 1, 28, 64), (75, 3, 28, 32),
]  # fmt: skip


def kernel_arguments(
    doc: str, more: Callable[[argparse.ArgumentParser], object] | None = None
) -> argparse.Namespace:
    """``--repeats`` and ``--threads`` of a script that times kernels called alone (its
    docstring's first paragraph as the description), and any that ``more`` adds; keeps freed
    memory, as every metalstm command does, and sets the thread count."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    return args


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def row(shape: tuple[int, int, int, int], episodes: int, repeats: int) -> str:
    images, channels, side, filters = shape
    last = torch.channels_last
    xs = [
        torch.randn(images, channels, side, side).contiguous(memory_format=last)
        for _ in range(episodes)
    ]
    ws = [torch.randn(filters, channels, 3, 3) for _ in range(episodes)]
    x, w = torch.cat(xs, 1).contiguous(memory_format=last), torch.cat(ws)
    d_y = torch.randn_like(F.conv2d(x, w, padding=1, groups=episodes)).contiguous(
        memory_format=last
    )
    d_ys = [
        d_y[:, e * filters : (e + 1) * filters].contiguous(memory_format=last)
        for e in range(episodes)
    ]
    backward = torch.ops.aten.convolution_backward

    def arguments(groups: int) -> tuple[object, ...]:
        return [1, 1], [1, 1], [1, 1], False, [0, 0], groups

    def weight_grads(grouped: bool) -> None:
        with single_threaded(x.device):
            if grouped:
                backward(d_y, x, w, None, *arguments(episodes), [False, True, False])
            else:
                for d, xe, we in zip(d_ys, xs, ws):
                    backward(d, xe, we, None, *arguments(1), [False, True, False])

    def input_grads(grouped: bool) -> None:
        if grouped:
            backward(d_y, x, w, None, *arguments(episodes), [True, False, False])
        else:
            for d, xe, we in zip(d_ys, xs, ws):
                backward(d, xe, we, None, *arguments(1), [True, False, False])

    figures = [
        median_ms(lambda: [F.conv2d(xe, we, padding=1) for xe, we in zip(xs, ws)], repeats),
        median_ms(lambda: F.conv2d(x, w, padding=1, groups=episodes), repeats),
        median_ms(lambda: weight_grads(False), repeats),
        median_ms(lambda: weight_grads(True), repeats),
        median_ms(lambda: input_grads(False), repeats),
        median_ms(lambda: input_grads(True), repeats),
    ]
    cells = " | ".join(f"{value:.2f}" for value in figures)
    return f"| {images} x {channels} x {side} x {side} → {filters} | {cells} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8, help="E (default 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (default 10)")
    args = parser.parse_args()
    keep_freed_memory()  # as every metalstm command does
    print(
        f"ms per {args.episodes} episodes: one at a time (E calls) / grouped (one call)\n\n"
        "| per episode: B x C x H x W → filters | forward, E calls | forward, grouped "
        "| weight gradient, E calls | grouped | input gradient, E calls | grouped |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    for shape in SHAPES:
        print(row(shape, args.episodes, args.repeats))
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
