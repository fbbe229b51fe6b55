"""What one meta-training task costs each comparison method, and what its recipe's training
length then costs: does a ``compare`` cell fit the budget on this machine?

For every (preset, method) asked, builds the method with ``compare``'s recipe for that preset
(the same config ``metalstm compare`` trains), draws training episodes from the recipe's own
sampler, and times the meta-gradient of each (``meta_loss(episode).loss.backward()``) after one
untimed episode. Prints seconds per task and the recipe's tasks x that, training only
(validation and the 600 test episodes come on top). One thread unless ``--threads``.

    METALSTM_DATA=../shared/data python benchmarks/task_cost.py \\
        --presets omniglot-20w1s omniglot-20w5s --methods maml maml-fo
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metalstm.allocator import keep_freed_memory
from metalstm.bench import cpu_name
from metalstm.compare import Request, add_compare_arguments, method_config
from metalstm.training import Trainer


def task_seconds(preset: str, method: str, tasks: int) -> tuple[float, int]:
    """(median seconds per meta-training task, the recipe's task count) of ``method``."""
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    request = Request.from_args(parser.parse_args(["--preset", preset, "--out", "unused"]))
    config = method_config(request, method, int)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder), log=None)
        episodes = [trainer.train_sampler.episode(i) for i in range(tasks + 1)]
        times = []
        for i, episode in enumerate(episodes):
            start = time.perf_counter()
            trainer.method.meta_loss(episode).loss.backward()
            if i > 0:  # the first one warms up
                times.append(time.perf_counter() - start)
    return statistics.median(times), config.episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["omniglot-20w1s", "omniglot-20w5s"])
    parser.add_argument("--methods", nargs="+", default=["maml", "maml-fo"])
    parser.add_argument("--tasks", type=int, default=4, help="timed tasks per cell")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {args.threads} thread(s)")
    print("| preset | method | s / task | recipe's tasks | training time |")
    print("| --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for method in args.methods:
            seconds, tasks = task_seconds(preset, method, args.tasks)
            minutes = seconds * tasks / 60
            print(f"| {preset} | {method} | {seconds:.3f} | {tasks} | {minutes:.0f} min |")


if __name__ == "__main__":
    main()
