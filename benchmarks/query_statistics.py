"""Which batch-norm statistics should normalise a meta-learner's test queries? Paired candidates.

Every candidate is non-transductive (nothing from the query batch) and scores the same adapted
learner θ_T on the same episodes, so the differences are paired:

- ``support``: the running statistics of the support passes at θ_0 .. θ_{T-1} (the authors');
- ``final``: a support pass at θ_T (``query_bn=final``: ``inner_loop.final_support_pass``);
- ``final+rot4``, ``final+flip``, ``final+shift1``: that pass on the support set and its four
  rotations, its mirror image, or its four one-pixel shifts (more images for the statistics);
- ``blend A``: A x the support passes' statistics + (1 - A) x population statistics, the mean of
  the support passes' statistics over ``--population`` training episodes of the same shape;
- ``transductive``: the query batch's own statistics, for reference (not a candidate).

Prints one row per candidate: accuracy ± 95 % CI and the paired difference to ``support``.
Choose on validation episodes (the default), report on test. Example::

    METALSTM_DATA=../shared/data python benchmarks/query_statistics.py --checkpoint omniglot-5w1s
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor

from metalstm.data import EpisodeSampler
from metalstm.evaluation import ci95
from metalstm.inner_loop import AdaptedLearner
from metalstm.learner import BatchNormState
from metalstm.machine import cpu_name
from metalstm.methods.base import InnerLoopMethod, accuracy
from metalstm.serialization import load_method
from metalstm.util import load_part

AUGMENTATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "final": lambda x: x,
    "final+rot4": lambda x: torch.cat([torch.rot90(x, r, (2, 3)) for r in range(4)]),
    "final+flip": lambda x: torch.cat([x, x.flip(3)]),
    "final+shift1": lambda x: torch.cat(
        [x, *(torch.roll(x, s, d) for d in (2, 3) for s in (1, -1))]
    ),
}
BLENDS = (0.8, 0.6, 0.4, 0.2, 0.0)


def population_statistics(
    model: InnerLoopMethod, sampler: EpisodeSampler, count: int
) -> BatchNormState:
    """The mean of the support passes' running statistics over ``count`` training episodes."""
    total: BatchNormState = {}
    for i in range(count):
        episode = sampler.episode(step=i)
        result = model.inner_loop(episode.support_x, episode.support_y, model.settings.eval_steps)
        for name, value in result.bn.items():
            total[name] = total.get(name, 0) + value / count
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="omniglot-5w1s")
    parser.add_argument("--part", default="val", choices=["val", "test"])
    parser.add_argument("--n-way", type=int)
    parser.add_argument("--k-shot", type=int)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--population", type=int, default=300, help="training episodes")
    parser.add_argument(
        "--only", help="comma-separated candidates to score (default: all; support always)"
    )
    args = parser.parse_args()
    wanted = None if args.only is None else {"support", *args.only.split(",")}
    given = {"n_way": args.n_way, "k_shot": args.k_shot, "query_bn": "support"}
    model, _ = load_method(args.checkpoint, "cpu", **{k: v for k, v in given.items() if v})
    assert isinstance(model, InnerLoopMethod), "an inner-loop method's checkpoint"
    config, learner = model.config, model.learner
    n_way, k_shot = config.n_way, config.k_shot
    seed = config.val_seed if args.part == "val" else config.test_seed
    episodes = EpisodeSampler(load_part(config, args.part), n_way, k_shot, 15, seed)
    scores: dict[str, list[float]] = {}
    with torch.no_grad():
        train = EpisodeSampler(load_part(config, "train"), n_way, k_shot, 1, 12345)
        blends = wanted is None or any(name.startswith("blend") for name in wanted)
        population = population_statistics(model, train, args.population if blends else 0)
        for i in range(args.episodes):
            episode = episodes.episode(step=i)
            result = model.inner_loop(
                episode.support_x, episode.support_y, model.settings.eval_steps
            )
            candidates: dict[str, tuple[BatchNormState, bool]] = {"support": (result.bn, False)}
            for name, augment in AUGMENTATIONS.items():
                if wanted is not None and name not in wanted:
                    continue
                bn = learner.fresh_batchnorm_state()
                learner(result.theta, augment(episode.support_x), bn, batch_stats=True)
                candidates[name] = (bn, False)
            for a in BLENDS if blends else ():
                blend = {k: a * v + (1 - a) * population[k] for k, v in result.bn.items()}
                candidates[f"blend {a:g}"] = (blend, False)
            candidates["transductive"] = (result.bn, True)
            if wanted is not None:
                candidates = {k: v for k, v in candidates.items() if k in wanted}
            for name, (bn, transductive) in candidates.items():
                classify = AdaptedLearner(learner, result.theta, bn, transductive)
                scores.setdefault(name, []).append(
                    accuracy(classify(episode.query_x), episode.query_y)
                )
    print(
        f"{args.checkpoint} on {args.episodes} {args.part} episodes, {n_way}-way {k_shot}-shot, "
        f"15 queries, T = {model.settings.eval_steps}; machine: {cpu_name()}"
    )
    base = torch.tensor(scores["support"])
    for name, values in scores.items():
        diff = torch.tensor(values) - base
        print(
            f"{name:>14}: {100 * base.new_tensor(values).mean():.2f} ± {100 * ci95(values):.2f} %"
            f"   paired difference {100 * diff.mean():+.2f} ± {100 * ci95(diff.tolist()):.2f}"
        )


if __name__ == "__main__":
    main()
