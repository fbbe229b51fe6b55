"""What a comparison method's training and evaluation cost in ``compare``: does its cell fit the
budget on this machine?

For every (preset, method) asked, builds the method with ``compare``'s recipe for that preset
(the same config ``metalstm compare`` trains) and times the part whose count the recipe sets:

* episode-trained methods (``maml``, ``maml-fo``, ...): the meta-gradient of a training task
  (``meta_loss(episode).loss.backward()``) on episodes from the recipe's own sampler; prints
  seconds per task and the recipe's tasks x that, training only (validation and the 600 test
  episodes come on top);
* ``finetune``: an SGD step of fine-tuning on validation episodes' support sets, from a
  pre-trained network (``--weights``, default the committed 20-way 1-shot comparison's, with real
  running statistics); prints milliseconds per step, the validation's cost (every episode
  fine-tunes each learning rate of the grid for the grid's largest step count) and the 600 test
  episodes' for each step count of the grid (validation chooses one); pre-training comes on top.

The first task or episode of each cell warms up, untimed. One thread unless ``--threads``.
``--episode-batch E`` times the recipe's tasks E at a time as one batched pass of the learner
(``Config.episode_batch``) and prints the seconds per task.

    METALSTM_DATA=../shared/data python benchmarks/task_cost.py \\
        --presets omniglot-20w1s omniglot-20w5s --methods maml maml-fo finetune
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metalstm import Config, override
from metalstm.allocator import keep_freed_memory
from metalstm.compare import Request, add_compare_arguments, method_config
from metalstm.data import Episodes
from metalstm.machine import cpu_name
from metalstm.methods.finetune import Finetune
from metalstm.methods.pretraining import parse_grid
from metalstm.serialization import load_method
from metalstm.training import Trainer

WEIGHTS = (
    Path(__file__).resolve().parent
    / "results/compare-recipes/omniglot-20w1s-finetune/methods/finetune/finetune.safetensors"
)


def recipe_trainer(preset: str, method: str, episode_batch: int = 1) -> Trainer:
    """A Trainer (samplers, fresh model) for ``compare``'s config of ``method`` on ``preset``
    (with ``episode_batch``)."""
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    request = Request.from_args(parser.parse_args(["--preset", preset, "--out", "unused"]))
    config: Config = override(method_config(request, method, int), {"episode_batch": episode_batch})
    with tempfile.TemporaryDirectory() as folder:
        return Trainer(config, Path(folder), log=None)


def task_seconds(trainer: Trainer, tasks: int) -> float:
    """Median seconds of a meta-training task's meta-gradient (of a batch of
    ``episode_batch`` tasks, divided by their number)."""
    size = trainer.config.episode_batch
    times = []
    for i in range(tasks + 1):
        episodes = [trainer.train_sampler.episode(i * size + j) for j in range(size)]
        item = Episodes.of(episodes)
        start = time.perf_counter()
        trainer.method.meta_loss(item).loss.backward()
        if i > 0:
            times.append((time.perf_counter() - start) / size)
    return statistics.median(times)


def finetune_step_seconds(trainer: Trainer, weights: Path, episodes: int, steps: int) -> float:
    """Median seconds of one fine-tuning SGD step on validation episodes' support sets."""
    model = trainer.method
    assert isinstance(model, Finetune)
    model.load_state_dict(load_method(weights)[0].state_dict())
    times = []
    for i in range(episodes + 1):
        episode = trainer.val_sampler.episode(i)
        start = time.perf_counter()
        model.fine_tune(episode.support_x, episode.support_y, float(model.finetune_lr), steps)
        if i > 0:
            times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def finetune_row(preset: str, trainer: Trainer, seconds: float) -> str:
    """The table row: a step's cost, the validation's and the test's for each step count."""
    assert isinstance(trainer.method, Finetune)
    settings = trainer.method.settings
    lrs = parse_grid(settings, "finetune_lr_grid", float)
    counts = [int(s) for s in parse_grid(settings, "finetune_steps_grid", int)]
    validation = seconds * trainer.config.val_episodes * len(lrs) * max(counts) / 60
    test = ", ".join(f"{count}: {seconds * 600 * count / 60:.0f} min" for count in counts)
    return f"| {preset} | {1000 * seconds:.1f} | {validation:.0f} min | {test} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["omniglot-20w1s", "omniglot-20w5s"])
    parser.add_argument("--methods", nargs="+", default=["maml", "maml-fo"])
    parser.add_argument("--tasks", type=int, default=4, help="timed tasks per cell")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="a finetune checkpoint")
    parser.add_argument("--episodes", type=int, default=3, help="timed finetune episodes")
    parser.add_argument("--steps", type=int, default=20, help="SGD steps per timed episode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--episode-batch", type=int, default=1, help="tasks per batched pass")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {args.threads} thread(s)")
    tasks = [m for m in args.methods if m != "finetune"]
    if tasks:
        print("| preset | method | s / task | recipe's tasks | training time |")
        print("| --- | --- | --- | --- | --- |")
        for preset in args.presets:
            for method in tasks:
                trainer = recipe_trainer(preset, method, args.episode_batch)
                seconds, count = task_seconds(trainer, args.tasks), trainer.config.episodes
                minutes = seconds * count / 60
                print(f"| {preset} | {method} | {seconds:.3f} | {count} | {minutes:.0f} min |")
    if "finetune" in args.methods:
        print(
            "| preset | ms / step | validation | 600 test episodes at each step count of the grid |"
        )
        print("| --- | --- | --- | --- |")
        for preset in args.presets:
            trainer = recipe_trainer(preset, "finetune")
            seconds = finetune_step_seconds(trainer, args.weights, args.episodes, args.steps)
            print(finetune_row(preset, trainer, seconds))


if __name__ == "__main__":
    main()
