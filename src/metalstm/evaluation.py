"""Evaluation on fixed episodes: mean accuracy with a 95% confidence interval.

The test protocol of the paper: a fixed list of episodes (identified by split, N, K, Q, seed and
count, see :func:`metalstm.data.fixed_episodes`), each scored by the accuracy on its query set;
the result is ``mean ± 1.96 · std / √E``. Episodes can be sharded across ranks; the per-episode
accuracies are gathered so the figure is the same whatever the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .algorithm import Adapter, Algorithm, accuracy
from .config import Config
from .data import ClassImages, EpisodeSampler, load_split
from .distributed import Distributed
from .errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    """What a reported number was measured on: stated next to every accuracy."""

    dataset: str
    split: str
    part: str
    n_way: int
    k_shot: int
    q_query: int
    adaptation: str  # the method's test-time settings (Algorithm.adaptation), e.g. "T = 8"
    bn_mode: str  # Algorithm.test_batchnorm: "support statistics", "transductive", ...
    episodes: int
    seed: int

    def describe(self) -> str:
        adaptation = f"{self.adaptation}, " if self.adaptation else ""
        return (
            f"{self.dataset}/{self.split} {self.part}, {self.n_way}-way {self.k_shot}-shot, "
            f"{self.q_query} queries per class, {adaptation}BN: {self.bn_mode}, "
            f"episodes seed {self.seed}"
        )


@dataclass
class EvalResult:
    accuracies: list[float]  # per episode, in [0, 1]
    protocol: Protocol
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the mean: 1.96 · std / √E."""
        n = len(self.accuracies)
        if n < 2:
            return float("nan")
        mean = self.mean
        var = sum((a - mean) ** 2 for a in self.accuracies) / (n - 1)
        return 1.96 * math.sqrt(var / n)

    def line(self) -> str:
        """``accuracy: MEAN ± CI % (E episodes, 95% CI)``."""
        return (
            f"accuracy: {100 * self.mean:.2f} ± {100 * self.ci95:.2f} % "
            f"({len(self.accuracies)} episodes, 95% CI)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.mean,
            "ci95": self.ci95,
            "episodes": len(self.accuracies),
            "protocol": asdict(self.protocol),
            "per_episode": self.accuracies,
            **self.extra,
        }


def load_part(config: Config, part: str) -> ClassImages:
    """The images of ``part`` (train, val or test) of the config's dataset and split."""
    return load_split(
        config.dataset,
        config.split,
        part,
        data_root=config.data_root,
        image_size=config.image_size,
        channels=config.channels,
    )


def protocol_for(
    algorithm: Algorithm, config: Config, part: str, episodes: int, seed: int
) -> Protocol:
    """The protocol of ``algorithm`` scored on the fixed episodes (config, part, count, seed)."""
    return Protocol(
        dataset=config.dataset,
        split=config.split,
        part=part,
        n_way=config.n_way,
        k_shot=config.k_shot,
        q_query=config.test_queries,
        adaptation=algorithm.adaptation(),
        bn_mode=algorithm.test_batchnorm(),
        episodes=episodes,
        seed=seed,
    )


def episode_accuracies(
    algorithm: Algorithm,
    sampler: EpisodeSampler,
    indices: Sequence[int],
    on_episode: Callable[[int], None] | None = None,
) -> list[float]:
    """Query accuracy of ``algorithm`` on the fixed episodes ``indices`` of ``sampler``."""
    scores = candidate_accuracies(algorithm, sampler, indices, algorithm.adapt_one, on_episode)
    return [accuracies[0] for accuracies in scores]


def candidate_accuracies(
    algorithm: Algorithm,
    sampler: EpisodeSampler,
    indices: Sequence[int],
    adapt: Adapter,
    on_episode: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Per episode of ``indices``, the query accuracy of each classifier ``adapt`` returns for
    its support set (``algorithm`` in eval mode meanwhile)."""
    device = algorithm.device
    scores = []
    was_training = algorithm.training
    algorithm.eval()
    try:
        for i in indices:
            episode = sampler.episode(step=i).to(device)
            classifiers = adapt(episode.support_x, episode.support_y)
            with torch.inference_mode():
                scores.append([accuracy(c(episode.query_x), episode.query_y) for c in classifiers])
            if on_episode is not None:
                on_episode(i)
    finally:
        algorithm.train(was_training)
    return scores


def evaluate(
    algorithm: Algorithm,
    *,
    part: str = "test",
    episodes: int | None = None,
    seed: int | None = None,
    config: Config | None = None,
    on_episode: Callable[[int], None] | None = None,
    dist: Distributed | None = None,
) -> EvalResult:
    """Evaluate on the fixed episodes of ``part`` (default: the config's test episodes).

    With ``dist``, rank r scores episodes r, r + W, ... and the accuracies are gathered, so the
    result is exactly the single-process one.
    """
    dist = dist or Distributed.single()
    config = config or algorithm.config
    count = episodes if episodes is not None else config.test_episodes
    if count < 1:
        raise ConfigError(f"episodes={count} is invalid; evaluate on at least 1 episode")
    seed = seed if seed is not None else config.test_seed
    sampler = EpisodeSampler(
        load_part(config, part), config.n_way, config.k_shot, config.test_queries, seed
    )
    indices = range(dist.rank, count, dist.world_size)
    accuracies = dist.gather_episodes(
        episode_accuracies(algorithm, sampler, indices, on_episode), count
    )
    return EvalResult(accuracies, protocol_for(algorithm, config, part, count, seed))
