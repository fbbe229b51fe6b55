"""Every method on the same fixed test episodes, checked by fingerprint, through ``evaluate``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from ..config import Config
from ..data import ClassImages, Episode, EpisodeDigest, EpisodeSampler, fixed_episodes
from ..errors import MetaLSTMError
from ..evaluation import EvalResult, Protocol, evaluate
from ..methods.base import NO_BATCHNORM, Method, episode_batchnorm
from ..progress import format_seconds
from ..registry import TrainsOn, method_entry
from ..serialization import load_method
from ..util import load_part, resolve_device
from .configs import (
    ComparisonProgress,
    base_config,
)
from .request import Request, say
from .training import (
    Trained,
)


class RecordingSampler(EpisodeSampler):
    """An :class:`EpisodeSampler` that fingerprints every episode it hands out.

    Only a running digest is kept, not the episodes: a record of many episodes would leave small
    long-lived tensors between an evaluation's large temporaries, and with the allocator that keeps
    freed memory (:mod:`metalstm.allocator`) such fragments grew a 600-episode 20-way evaluation's
    memory by 8 MB per episode.
    """

    def __init__(self, data: ClassImages, n_way: int, k_shot: int, q_query: int, seed: int):
        super().__init__(data, n_way, k_shot, q_query, seed)
        self.digest = EpisodeDigest()
        self.served = 0

    def episode(self, step: int, slot: int = 0) -> Episode:
        episode = super().episode(step, slot)
        self.digest.add(episode)
        self.served += 1
        return episode

    def fingerprint(self) -> str:
        """Fingerprint of the episodes served so far (classes and image rows)."""
        return self.digest.hexdigest()


@dataclass
class MethodResult:
    method: str
    title: str
    result: EvalResult
    trained: Trained
    fingerprint: str
    eval_seconds: float
    notes: str
    published: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "title": self.title,
            "accuracy": self.result.mean,
            "ci95": self.result.ci95,
            "episodes": len(self.result.accuracies),
            "train_seconds": self.trained.seconds,
            "train_origin": self.trained.origin,
            "eval_seconds": self.eval_seconds,
            "published": self.published,
            "notes": self.notes,
            "checkpoint": str(self.trained.checkpoint),
            "fingerprint": self.fingerprint,
            "protocol": asdict(self.result.protocol),
            "per_episode": self.result.accuracies,
        }


def method_notes(model: Method, trained: Trained, protocol: Protocol, base: Config) -> str:
    """A short description of the settings behind a method's number: its test-time adaptation,
    its batch-norm statistics where they are not the protocol line's, its training."""
    notes = [protocol.adaptation] if protocol.adaptation else []
    if protocol.bn_mode not in (episode_batchnorm(base.transductive), NO_BATCHNORM):
        notes.append(f"BN: {protocol.bn_mode}")
    if method_entry(model.name).trains_on is TrainsOn.EPISODES:
        notes.append(f"{model.config.episodes} training episodes")
    if trained.note:
        notes.append(trained.note)
    return "; ".join(notes)


def evaluate_methods(
    request: Request,
    trained: dict[str, Trained],
    log: TextIO | None,
    progress: ComparisonProgress,
) -> tuple[list[MethodResult], str, Config]:
    """Evaluate every method on the same fixed test episodes; returns results and fingerprint."""
    base = base_config(request)
    device = resolve_device(base.device)
    test = load_part(base, "test")
    count, seed = base.test_episodes, base.test_seed
    expected = fixed_episodes(test, base.n_way, base.k_shot, base.eval_queries, seed, count)
    fingerprint = expected.fingerprint()
    setting = (base.dataset, base.n_way, base.k_shot)
    results = []
    for method, info in trained.items():
        overrides: dict[str, Any] = {"transductive": base.transductive}
        if base.data_root is not None:
            overrides["data_root"] = base.data_root
        model, _ = load_method(info.checkpoint, device=device, **overrides)
        sampler = RecordingSampler(test, base.n_way, base.k_shot, base.eval_queries, seed)
        start = time.perf_counter()
        with progress.stage(method, "evaluation"):
            result = evaluate(model, episodes=count, seed=seed, progress=log, sampler=sampler)
        seconds = time.perf_counter() - start
        served = sampler.fingerprint()
        if served != fingerprint:
            raise MetaLSTMError(
                f"{method} was evaluated on other episodes than the comparison's fixed ones "
                f"(fingerprint {served[:12]} != {fingerprint[:12]})"
            )
        entry = method_entry(method)
        row = MethodResult(
            method,
            entry.title,
            result,
            info,
            served,
            seconds,
            method_notes(model, info, result.protocol, base),
            entry.published.get(setting),
        )
        say(log, f"{method}: {result.line()} [{format_seconds(seconds)}]")
        results.append(row)
    return results, fingerprint, base
