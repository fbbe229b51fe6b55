"""Evaluation on fixed episodes: mean accuracy with a 95% confidence interval.

The test protocol of the paper: a fixed list of episodes (identified by split, N, K, Q, seed and
count, see :func:`metalstm.data.fixed_episodes`), each scored by the accuracy on its query set;
the result is ``mean ± 1.96 · std / √E``. Episodes can be sharded across ranks; the per-episode
accuracies are gathered so the figure is the same whatever the number of processes.

Given a ``progress`` stream (the CLI passes stderr unless ``--quiet``), an evaluation shows a
live line there: episodes done, episodes/s, the running accuracy ± 95% CI (the formula of the
final result) and the time left; see :mod:`metalstm.progress` for how often.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch

from .config import Config
from .data import Episode, Episodes, EpisodeSampler
from .distributed import Distributed
from .errors import ConfigError
from .methods.base import Adapter, Method, accuracy
from .progress import LiveLine
from .util import load_part


@dataclass(frozen=True)
class Protocol:
    """What a reported number was measured on: stated next to every accuracy."""

    dataset: str
    split: str
    part: str
    n_way: int
    k_shot: int
    q_query: int
    adaptation: str  # the method's test-time settings (Method.adaptation), e.g. "T = 8"
    bn_mode: str  # Method.test_batchnorm: "support statistics", "transductive", ...
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
        return ci95(self.accuracies)

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


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values``: 1.96 · std / √n
    (sample standard deviation; nan for fewer than two values)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return 1.96 * math.sqrt(var / n)


class EvaluationProgress:
    """The live line of an evaluation, e.g.
    ``test episode 150/600 | 6.2 episodes/s | acc 92.41 ± 1.05 % | ETA 1m12s``.

    With several classifiers per episode (settings chosen on validation), the accuracy shown is
    the best one's so far.
    """

    def __init__(self, out: TextIO | None, total: int, label: str) -> None:
        self.line = LiveLine(out, total)
        self.label = label
        self.scores: list[list[float]] = []  # [episodes][classifiers]

    def add(self, accuracies: list[float]) -> None:
        """One more episode scored, with the accuracy of each of its classifiers."""
        self.scores.append(accuracies)
        self.line.update(len(self.scores), self.text)

    def text(self) -> str:
        columns = [list(column) for column in zip(*self.scores, strict=True)]
        best = max(columns, key=sum)
        spread = ci95(best)
        ci = f" ± {100 * spread:.2f}" if math.isfinite(spread) else ""
        which = f" (best of {len(columns)} settings)" if len(columns) > 1 else ""
        return (
            f"{self.label} {len(self.scores)}/{self.line.total} | "
            f"{self.line.rate():.1f} episodes/s | "
            f"acc {100 * sum(best) / len(best):.2f}{ci} %{which} | {self.line.timing()}"
        )

    def close(self) -> None:
        self.line.close()


def protocol_for(method: Method, config: Config, part: str, episodes: int, seed: int) -> Protocol:
    """The protocol of ``method`` scored on the fixed episodes (config, part, count, seed)."""
    return Protocol(
        dataset=config.dataset,
        split=config.split,
        part=part,
        n_way=config.n_way,
        k_shot=config.k_shot,
        q_query=config.eval_queries,
        adaptation=method.adaptation(),
        bn_mode=method.test_batchnorm(),
        episodes=episodes,
        seed=seed,
    )


def episode_accuracies(
    method: Method,
    sampler: EpisodeSampler,
    indices: Sequence[int],
    progress: TextIO | None = None,
    label: str = "test episode",
) -> list[float]:
    """Query accuracy of ``method`` on the fixed episodes ``indices`` of ``sampler`` (a live
    line on ``progress``, its episodes called ``label``)."""
    scores = candidate_accuracies(
        method, sampler, indices, method.adapt_one, progress, label, episode_batch(method)
    )
    return [accuracies[0] for accuracies in scores]


def episode_batch(method: Method) -> int:
    """How many episodes ``method`` scores as one batch: ``Config.episode_batch`` where the
    method takes batches of episodes (:meth:`Method.batches_episodes`), else 1."""
    return method.config.episode_batch if method.batches_episodes() else 1


def candidate_accuracies(
    method: Method,
    sampler: EpisodeSampler,
    indices: Sequence[int],
    adapt: Adapter,
    progress: TextIO | None = None,
    label: str = "test episode",
    batch: int = 1,
) -> list[list[float]]:
    """Per episode of ``indices``, the query accuracy of each classifier ``adapt`` returns for
    its support set (``method`` in eval mode meanwhile; a live line on ``progress``). With
    ``batch`` > 1, consecutive episodes go to ``adapt`` together, ``batch`` at a time
    (:class:`~metalstm.data.Episodes`; only an adapter of a method that batches episodes)."""
    device = method.device
    report = EvaluationProgress(progress, len(indices), label)
    was_training = method.training
    method.eval()
    try:
        for start in range(0, len(indices), batch):
            chunk = [sampler.episode(step=i).to(device) for i in indices[start : start + batch]]
            for scores in score_episodes(adapt, chunk):
                report.add(scores)
    finally:
        method.train(was_training)
        report.close()
    return report.scores


def score_episodes(adapt: Adapter, episodes: Sequence[Episode]) -> list[list[float]]:
    """Per episode, the query accuracy of each classifier ``adapt`` returns for its support set;
    several episodes go to ``adapt`` as one batch (:class:`~metalstm.data.Episodes`)."""
    episode = Episodes.of(episodes)
    classifiers = adapt(episode.support_x, episode.support_y)
    with torch.inference_mode():
        logits = [c(episode.query_x) for c in classifiers]  # [(E,) N*Q, N] each
    if len(episodes) == 1:
        return [[accuracy(x, episode.query_y) for x in logits]]
    return [[accuracy(x[e], episode.query_y[e]) for x in logits] for e in range(len(episodes))]


def evaluate(
    method: Method,
    *,
    part: str = "test",
    episodes: int | None = None,
    seed: int | None = None,
    config: Config | None = None,
    progress: TextIO | None = None,
    dist: Distributed | None = None,
    sampler: EpisodeSampler | None = None,
) -> EvalResult:
    """Evaluate on the fixed episodes of ``part`` (default: the config's test episodes).

    ``sampler``: the episodes' sampler, when the caller needs its own (``compare`` records the
    episodes each method saw); it must draw ``part``'s episodes of ``seed``.

    ``progress``: a stream for the live progress line (e.g. ``sys.stderr``; default: silent).
    With ``dist``, rank r scores episodes r, r + W, ... and the accuracies are gathered, so the
    result is exactly the single-process one (only rank 0 shows progress, of its share).
    """
    dist = dist or Distributed.single()
    config = config or method.config
    count = episodes if episodes is not None else config.test_episodes
    if count < 1:
        raise ConfigError(f"episodes={count} is invalid; evaluate on at least 1 episode")
    seed = seed if seed is not None else config.test_seed
    if sampler is None:
        sampler = EpisodeSampler(
            load_part(config, part), config.n_way, config.k_shot, config.eval_queries, seed
        )
    block = episode_batch(method)
    indices = dist.shard_episodes(count, block)
    shown = progress if dist.is_main else None
    accuracies = dist.gather_episodes(
        episode_accuracies(method, sampler, indices, shown, f"{part} episode"), count, block
    )
    return EvalResult(accuracies, protocol_for(method, config, part, count, seed))
