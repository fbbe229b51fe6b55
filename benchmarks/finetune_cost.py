"""What Baseline-finetune's validation and test cost in ``compare``: does its cell fit the budget?

Builds ``finetune`` with ``compare``'s recipe for each preset (the config ``metalstm compare``
trains), loads a pre-trained network into it (``--weights``, default the committed 20-way 1-shot
comparison's: real running statistics), and times SGD steps of fine-tuning on validation
episodes' support sets, the steps whose cost grows with the chosen step count. Prints
milliseconds per step, the validation's cost (every episode fine-tunes each learning rate of the
grid for the grid's largest step count) and the 600 test episodes' cost for each step count of
the grid (validation chooses one). One thread unless ``--threads``.

    METALSTM_DATA=../shared/data python benchmarks/finetune_cost.py --presets omniglot-20w5s
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
from metalstm.methods.finetune import Finetune
from metalstm.methods.pretraining import parse_grid
from metalstm.serialization import load_method
from metalstm.training import Trainer

WEIGHTS = (
    Path(__file__).resolve().parent
    / "results/compare-recipes/omniglot-20w1s-finetune/methods/finetune/finetune.safetensors"
)


def step_seconds(preset: str, weights: Path, episodes: int, steps: int) -> tuple[float, Finetune]:
    """(median seconds per fine-tuning SGD step, the method) on ``preset``'s validation episodes."""
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    request = Request.from_args(parser.parse_args(["--preset", preset, "--out", "unused"]))
    config = method_config(request, "finetune", int)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder), log=None)
        sampler, model = trainer.val_sampler, trainer.method
    assert isinstance(model, Finetune)
    trained, _ = load_method(weights)
    model.load_state_dict(trained.state_dict())
    lr = float(model.finetune_lr)
    times = []
    for i in range(episodes + 1):
        episode = sampler.episode(i)
        start = time.perf_counter()
        model.fine_tune(episode.support_x, episode.support_y, lr, steps)
        if i > 0:  # the first one warms up
            times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["omniglot-20w1s", "omniglot-20w5s"])
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="a finetune checkpoint")
    parser.add_argument("--episodes", type=int, default=3, help="timed episodes per preset")
    parser.add_argument("--steps", type=int, default=20, help="SGD steps per timed episode")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {args.threads} thread(s)")
    print("| preset | ms / step | validation | 600 test episodes at each step count of the grid |")
    print("| --- | --- | --- | --- |")
    for preset in args.presets:
        seconds, model = step_seconds(preset, args.weights, args.episodes, args.steps)
        lrs = parse_grid(model.settings, "finetune_lr_grid", float)
        counts = [int(s) for s in parse_grid(model.settings, "finetune_steps_grid", int)]
        validation = seconds * model.config.val_episodes * len(lrs) * max(counts) / 60
        test = ", ".join(f"{count}: {seconds * 600 * count / 60:.0f} min" for count in counts)
        print(f"| {preset} | {1000 * seconds:.1f} | {validation:.0f} min | {test} |")


if __name__ == "__main__":
    main()
