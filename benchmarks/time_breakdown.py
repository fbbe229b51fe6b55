"""Where the time of a benchmark episode goes: torch.profiler over the `metalstm bench` workload.

Usage::

    python benchmarks/time_breakdown.py [metalstm bench flags] [--top 15]
    python benchmarks/time_breakdown.py --image-size 84 --channels 3 --shots 5 --steps 8

Builds the same model, synthetic episodes and step as ``metalstm bench`` (same flags), runs the
warm-up, then profiles ``--episodes`` episodes and prints

1. milliseconds per episode in each part of the algorithm: the learner's support passes (L_t and
   g_t, forward and backward, T per episode), the meta-learner LSTM's forward and backward, the
   learner's query pass and its backward into θ_T, the optimizer (zero_grad, clipping, Adam),
   episode sampling, and the rest;
2. the ``--top`` operators by self time.

Each operator's self time is charged to the outermost labelled region it ran in, and so is a
region's own time outside operators (Python, and native kernels the library calls without an
operator, such as the meta-learner step's forward; one row of the operator table). The labels are
``torch.profiler.record_function`` wrappers this script puts around the library's functions at
run time; the library itself carries no profiling code. Times are those of the calling thread
(intra-op worker threads are inside their operator's time), so the parts add up to the wall time.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from metalstm import bench, inner_loop, learner
from metalstm.allocator import keep_freed_memory
from metalstm.methods.metalearner import MetaLearnerCell

SUPPORT = "learner: support passes (L_t, g_t)"
LSTM_FORWARD = "meta-learner LSTM: forward (preprocessing, both layers, update)"
LSTM_BACKWARD = "meta-learner LSTM: backward"
QUERY = "learner: query pass"
QUERY_BACKWARD = "learner: backward of the query loss into θ_T"
OPTIMIZER = "optimizer: zero_grad, clipping, Adam"
SAMPLING = "episode sampling"
OTHER = "other"
PARTS = (SUPPORT, LSTM_FORWARD, LSTM_BACKWARD, QUERY, QUERY_BACKWARD, OPTIMIZER, SAMPLING, OTHER)
OUTSIDE_OPERATORS = "(in a part, outside operators: Python, native kernels called directly)"
# The meta-learner's backward nodes: one per step, or one per first-order chain of steps.
LSTM_BACKWARD_NODES = ("CellStepBackward", "ChainedStepsBackward")


def labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run inside ``record_function(label)``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def label_the_library() -> None:
    """Wrap the functions that make up an episode in labelled regions (this process only)."""
    inner_loop.learner_loss_and_grad = labelled(SUPPORT, inner_loop.learner_loss_and_grad)
    cell = MetaLearnerCell
    cell.forward = labelled(LSTM_FORWARD, cell.forward)  # type: ignore[method-assign]
    learner.Learner.__call__ = labelled(QUERY, learner.Learner.__call__)  # type: ignore[method-assign]
    torch.nn.utils.clip_grad_norm_ = labelled(OPTIMIZER, torch.nn.utils.clip_grad_norm_)
    draw = bench.SyntheticEpisodes.draw
    bench.SyntheticEpisodes.draw = labelled(SAMPLING, draw)  # type: ignore[method-assign]


def part_of(event: FunctionEvent) -> str:
    """The part an operator's self time belongs to: its outermost labelled region; else the
    backward node it runs in (the LSTM step's, or one of the learner's); else "other"."""
    part: str | None = None
    node: FunctionEvent | None = event
    cell_backward = backward = False
    while node is not None:
        if node.name in PARTS:
            part = node.name
        elif node.name.startswith("Optimizer."):
            part = OPTIMIZER
        cell_backward = cell_backward or any(name in node.name for name in LSTM_BACKWARD_NODES)
        backward = backward or node.name.startswith("autograd::engine")
        node = node.cpu_parent
    if part is not None:
        return part
    if cell_backward:
        return LSTM_BACKWARD
    return QUERY_BACKWARD if backward else OTHER


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_bench_arguments(parser)
    parser.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    parser.set_defaults(episodes=5)
    args = parser.parse_args()
    # As `metalstm bench` runs: without it, the page faults of fresh allocations are charged to
    # whichever operator first writes a new block (e.g. a copy_ inside addmm).
    keep_freed_memory()
    label_the_library()
    work = bench.build_workload(args)
    for _ in range(max(args.warmup, 0)):
        work.run()
    calls = max(1, -(-args.episodes // work.per_call))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            work.run()
        bench._synchronize(work.device)
    episodes = calls * work.per_call
    per_part: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.events():
        # a label's own time: what ran in it outside any operator (Python, native kernels called
        # directly: the meta-learner step's forward)
        name = OUTSIDE_OPERATORS if event.name in PARTS else event.name
        per_part[part_of(event)] += event.self_cpu_time_total
        per_op[name] += event.self_cpu_time_total
    total = sum(per_part.values())
    s, threads = work.config, torch.get_num_threads()
    print(
        f"{args.mode}: {s.image_size}x{s.image_size}x{s.channels}, {s.n_way}-way {s.k_shot}-shot, "
        f"T = {args.steps} on {work.batch}, {s.filters} filters, {work.device} "
        f"({threads} thread{'s' if threads > 1 else ''}), {episodes} profiled episodes"
    )
    print("\n| part | ms per episode | share |\n| --- | --- | --- |")
    for part in PARTS:
        if per_part.get(part):
            ms = per_part[part] / 1e3 / episodes
            print(f"| {part} | {ms:.1f} | {100 * per_part[part] / total:.0f} % |")
    print(f"| **total** | **{total / 1e3 / episodes:.1f}** | |")
    print("\n| operator (self time) | ms per episode | share |\n| --- | --- | --- |")
    for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| `{name}` | {us / 1e3 / episodes:.1f} | {100 * us / total:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
