"""Each method's training config (preset, its registered recipe, ``--set``) and the comparison's
progress line and ETA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import Config, load_preset, override, with_recipe
from ..errors import ConfigError
from ..progress import Surrounding, format_seconds, surrounding
from ..registry import BatchSettings, TrainsOn, method_entry
from ..util import load_part
from .request import Request


def base_config(request: Request) -> Config:
    """The preset with the common overrides: what defines the test episodes."""
    values: dict[str, Any] = dict(request.overrides)
    if request.data_root is not None:
        values["data_root"] = request.data_root
    if request.episodes is not None:
        values["test_episodes"] = request.episodes
    if request.seed is not None:
        values["test_seed"] = request.seed
    # --set applies to every method that has the key (a setting of one method skips the others).
    return override(load_preset(request.preset), values, strict=False)


def method_config(request: Request, method: str, train_images: Callable[[], int]) -> Config:
    """The training config of ``method``: preset, recipe, --set, --set METHOD:, --train-episodes.

    The preset is the meta-learner's recipe; another method starts from it as
    :func:`~metalstm.config.with_recipe` says.
    """
    config = with_recipe(base_config(request), method)
    config = override(config, request.overrides, strict=False)
    config = override(config, request.method_overrides.get(method, {}))
    if request.train_episodes is not None:
        settings = config.settings
        if isinstance(settings, BatchSettings):  # N mini-batches: N / (batches per epoch) epochs
            per_epoch = max(1, train_images() // settings.pretrain_batch)
            config = override(config, {"pretrain_epochs": request.train_episodes / per_epoch})
        else:
            config = override(config, {"episodes": request.train_episodes})
    return config


def check_compatible(method: str, config: Config, base: Config, path: Path) -> None:
    """Refuse a checkpoint trained for other episodes or images than the comparison's."""
    keys = ("dataset", "split", "image_size", "channels", "n_way", "k_shot")
    if method_entry(method).trains_on is TrainsOn.NOTHING:
        return
    for key in keys:
        if getattr(config, key) != getattr(base, key):
            raise ConfigError(
                f"checkpoint {path} for {method} was trained with {key}={getattr(config, key)!r} "
                f"but the comparison uses {key}={getattr(base, key)!r}; pass a checkpoint "
                "trained for these episodes"
            )


TRANSDUCTIVE_STAGE = "transductive evaluation"


class ComparisonProgress:
    """The comparison's own status in front of every progress line of its training and evaluation
    runs: ``method 3/9 (NAME) | comparison ETA ~41m | episode 200/5000 | ...``.

    The comparison's time left is an estimate: the running job's own ETA, plus the work still
    planned (training episodes or pre-training mini-batches, test episodes; see
    :func:`planned_work`) at the comparison's average time per unit of work so far.
    """

    def __init__(self, methods: Sequence[str], planned: dict[tuple[str, str], int]) -> None:
        self.methods = tuple(methods)
        self.left = dict(planned)  # (method, "training" or "evaluation") -> units, not yet run
        self.units_done = 0.0
        self.t0 = time.perf_counter()
        self.method = ""
        self.units = 0  # planned units of the running stage
        self.block: Surrounding | None = None

    @contextmanager
    def stage(self, method: str, kind: str) -> Iterator[None]:
        """The block trains (``kind="training"``) or evaluates ``method``."""
        self.method, self.units = method, self.left.pop((method, kind), 0)
        with surrounding(self.prefix) as block:
            self.block = block
            try:
                yield
            finally:
                self.units_done += self.stage_units_done()
                self.block = None

    def skip(self, method: str, kind: str) -> None:
        """The planned stage will not run (its work leaves the estimate)."""
        self.left.pop((method, kind), None)

    def stage_units_done(self) -> float:
        """Units of the running stage done so far, by its main progress line."""
        main = self.block.main if self.block is not None else None
        if main is None or main.total <= 0:
            return 0.0
        return self.units * (main.done - main.start) / main.total

    def eta(self) -> float:
        """Seconds the whole comparison still needs (an estimate; inf before any work)."""
        done = self.units_done + self.stage_units_done()
        if done <= 0:
            return math.inf
        per_unit = (time.perf_counter() - self.t0) / done
        main = self.block.main if self.block is not None else None
        running = main.eta() if main is not None else 0.0
        return running + sum(self.left.values()) * per_unit

    def prefix(self) -> str:
        number = self.methods.index(self.method) + 1
        return (
            f"method {number}/{len(self.methods)} ({self.method}) | "
            f"comparison ETA ~{format_seconds(self.eta())} | "
        )


def planned_work(request: Request, train_images: Callable[[], int]) -> dict[tuple[str, str], int]:
    """Units of work of each stage of the comparison, for its ETA: training episodes (pre-training:
    mini-batches) of every method trained here, and its test episodes (twice under the
    non-transductive protocol: see :func:`~metalstm.compare.evaluation.evaluate_methods`). A run
    found finished turns out to need none."""
    base = base_config(request)
    planned = {}
    for method in request.methods:
        units, entry = 0, method_entry(method)
        trained_here = entry.trains_on is not TrainsOn.NOTHING and entry.uses_training_of is None
        if method not in request.checkpoints and trained_here:
            config = method_config(request, method, train_images)
            units = config.episodes
            settings = config.settings
            if isinstance(settings, BatchSettings):
                batches = settings.pretrain_epochs * train_images() / settings.pretrain_batch
                units = math.ceil(batches)
        planned[(method, "training")] = units
        planned[(method, "evaluation")] = base.test_episodes
        if not base.transductive:
            planned[(method, TRANSDUCTIVE_STAGE)] = base.test_episodes
    return planned


def train_image_count(base: Config) -> Callable[[], int]:
    """The number of training images, loaded on the first call only (when it is needed)."""
    images: list[int] = []

    def train_images() -> int:
        if not images:
            images.append(int(load_part(base, "train").class_count.sum()))
        return images[0]

    return train_images
