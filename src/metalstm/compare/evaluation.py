"""Every method on the same fixed test episodes, checked by fingerprint, through ``evaluate``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from ..config import Config
from ..data import ClassImages, Episode, EpisodeDigest, EpisodeSampler, fixed_episodes
from ..errors import MetaLSTMError
from ..evaluation import EvalResult, Protocol, evaluate
from ..learner import DOWNSAMPLING
from ..methods.base import NO_BATCHNORM, Method, episode_batchnorm
from ..progress import format_seconds
from ..registry import TrainsOn, method_entry
from ..serialization import load_method
from ..util import load_part, resolve_device
from .configs import TRANSDUCTIVE_STAGE, ComparisonProgress, base_config
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
    eval_cpu_seconds: float  # every thread of the process
    notes: str
    published: float | None
    # The same checkpoint with the query batch's own statistics (transductive batch norm, the
    # protocol of several published figures) beside a non-transductive comparison; None where
    # the protocol is transductive already or the method's test statistics do not depend on it.
    transductive: EvalResult | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "title": self.title,
            "accuracy": self.result.mean,
            "ci95": self.result.ci95,
            "transductive_accuracy": None if self.transductive is None else self.transductive.mean,
            "transductive_ci95": None if self.transductive is None else self.transductive.ci95,
            "episodes": len(self.result.accuracies),
            "train_seconds": self.trained.cost.seconds,
            "train_cpu_seconds": self.trained.cost.cpu_seconds,
            "train_machines": list(self.trained.cost.machines),
            "train_origin": self.trained.origin,
            "eval_seconds": self.eval_seconds,
            "eval_cpu_seconds": self.eval_cpu_seconds,
            "published": self.published,
            "notes": self.notes,
            "checkpoint": str(self.trained.checkpoint),
            "fingerprint": self.fingerprint,
            "protocol": asdict(self.result.protocol),
            "per_episode": self.result.accuracies,
        }


def method_notes(model: Method, trained: Trained, protocol: Protocol, base: Config) -> str:
    """A short description of the settings behind a method's number: its test-time adaptation,
    its batch-norm statistics where they are not the protocol line's, its learner where it is not
    the preset's, its training."""
    notes = [protocol.adaptation] if protocol.adaptation else []
    if model.config.downsample != base.downsample:
        notes.append(f"learner: {DOWNSAMPLING[model.config.downsample]}")
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
    """Evaluate every method on the same fixed test episodes; returns results and fingerprint.

    Under the non-transductive protocol a method whose query statistics come from the episode
    is evaluated a second time, transductively, on the same episodes (:attr:`MethodResult.
    transductive`), so a figure published with that protocol has its like beside ours.
    """
    base = base_config(request)
    fixed = FixedTest(base)
    results = []
    for method, info in trained.items():
        model = fixed.load(info.checkpoint, base.transductive)
        start, cpu_start = time.perf_counter(), time.process_time()
        with progress.stage(method, "evaluation"):
            result = fixed.evaluate(method, model, log)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        transductive = None
        if not base.transductive:
            other = fixed.load(info.checkpoint, transductive=True)
            if other.test_batchnorm() == episode_batchnorm(transductive=True):
                with progress.stage(method, TRANSDUCTIVE_STAGE):
                    transductive = fixed.evaluate(method, other, log)
            else:
                progress.skip(method, TRANSDUCTIVE_STAGE)
        entry = method_entry(method)
        row = MethodResult(
            method,
            entry.title,
            result,
            info,
            fixed.fingerprint,
            seconds,
            cpu_seconds,
            method_notes(model, info, result.protocol, base),
            entry.published_on(base),
            transductive,
        )
        extra = "" if transductive is None else f"; transductive {transductive.line()}"
        say(log, f"{method}: {result.line()}{extra} [{format_seconds(seconds)}]")
        results.append(row)
    return results, fixed.fingerprint, base


class FixedTest:
    """The comparison's fixed test episodes: loads a checkpoint for them and evaluates it,
    checking that it saw exactly these episodes (by fingerprint)."""

    def __init__(self, base: Config):
        self.base = base
        self.device = resolve_device(base.device)
        self.data = load_part(base, "test")
        shape = (base.n_way, base.k_shot, base.eval_queries)
        self.fingerprint = fixed_episodes(
            self.data, *shape, base.test_seed, base.test_episodes
        ).fingerprint()

    def load(self, checkpoint: Path, transductive: bool) -> Method:
        overrides: dict[str, Any] = {"transductive": transductive}
        if self.base.data_root is not None:
            overrides["data_root"] = self.base.data_root
        model, _ = load_method(checkpoint, device=self.device, **overrides)
        return model

    def evaluate(self, method: str, model: Method, log: TextIO | None) -> EvalResult:
        base = self.base
        sampler = RecordingSampler(
            self.data, base.n_way, base.k_shot, base.eval_queries, base.test_seed
        )
        result = evaluate(
            model, episodes=base.test_episodes, seed=base.test_seed, progress=log, sampler=sampler
        )
        served = sampler.fingerprint()
        if served != self.fingerprint:
            raise MetaLSTMError(
                f"{method} was evaluated on other episodes than the comparison's fixed ones "
                f"(fingerprint {served[:12]} != {self.fingerprint[:12]})"
            )
        return result
