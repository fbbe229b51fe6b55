"""A checkpoint for every method of the comparison: given, reused, trained or derived."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..checkpoint import read_checkpoint_meta, resolve_checkpoint, save_checkpoint
from ..config import Config
from ..errors import CheckpointError, ConfigError
from ..methods import build_method
from ..registry import TrainsOn, method_entry, method_names
from ..serialization import load_method, method_meta, method_tensors
from ..training import UNRECORDED, resume, train
from .configs import (
    ComparisonProgress,
    base_config,
    check_compatible,
    method_config,
)
from .request import Request, say


@dataclass(frozen=True)
class Cost:
    """What a method's training cost, from its run's :class:`~metalstm.training.TrainState`: wall
    seconds, CPU seconds (every thread of the main process) and the machines it ran on
    (:func:`metalstm.machine.describe`, in order). None and () where a checkpoint does not
    record them (written before they were recorded, or with no training state)."""

    seconds: float | None = None
    cpu_seconds: float | None = None
    machines: tuple[str, ...] = ()

    @classmethod
    def of(cls, state: Any) -> Cost:
        """The cost recorded in a training state (a checkpoint's ``train_state``)."""
        if not isinstance(state, dict):
            return cls()
        seconds, cpu = (state.get(key) for key in ("elapsed", "cpu_seconds"))
        machines = state.get("machines")
        if not isinstance(machines, list) or not machines or UNRECORDED in machines:
            cpu, machines = None, []  # CPU time of part of the run only, or of none of it
        return cls(
            float(seconds) if isinstance(seconds, int | float) else None,
            float(cpu) if isinstance(cpu, int | float) else None,
            tuple(str(m) for m in machines),
        )


@dataclass
class Trained:
    """Where a method's checkpoint came from and what its training cost."""

    checkpoint: Path
    cost: Cost
    origin: str  # "trained", "reused", "resumed", "given", "shared", "untrained"
    note: str = ""


def _training_cost(path: Path) -> Cost:
    """The training cost recorded in the run's last checkpoint (or in ``path`` itself)."""
    for candidate in (path.parent / "last.safetensors", path):
        try:
            meta = read_checkpoint_meta(candidate)
        except CheckpointError:
            continue
        if candidate != path and meta.get("config") != read_checkpoint_meta(path).get("config"):
            continue  # a last checkpoint of another run
        cost = Cost.of(meta.get("train_state"))
        if cost.seconds is not None:
            return cost
    return Cost()


def _finished_run(run_dir: Path, config: Config) -> tuple[bool, bool]:
    """(the run folder holds a run of exactly ``config``, that run finished)."""
    config_file, last = run_dir / "config.yaml", run_dir / "last.safetensors"
    if not (config_file.is_file() and last.is_file()):
        return False, False
    try:
        same = yaml.safe_load(config_file.read_text()) == config.to_dict()
        meta = read_checkpoint_meta(last)
    except (OSError, yaml.YAMLError, CheckpointError):
        return False, False
    stopped = (meta.get("train_state") or {}).get("stopped", "")
    return same, stopped in ("completed", "early stopping")


def train_method(method: str, config: Config, run_dir: Path, log: TextIO | None) -> Trained:
    """Train ``method`` in ``run_dir`` with the shared Trainer (reusing a finished run)."""
    same, finished = _finished_run(run_dir, config)
    best = run_dir / "best.safetensors"
    if same and finished and best.is_file():
        say(log, f"{method}: reusing the finished run in {run_dir}")
        return Trained(best, _training_cost(best), "reused")
    if same:
        say(log, f"{method}: resuming the run in {run_dir}")
        trainer = resume(run_dir, log=log)
        origin = "resumed"
    else:
        say(log, f"{method}: training in {run_dir}")
        trainer = train(config, run_dir, force=True, log=log)
        origin = "trained"
    if trainer.state.stopped == "interrupted":
        raise KeyboardInterrupt
    return Trained(best, Cost.of(asdict(trainer.state)), origin)


def write_untrained(method: str, config: Config, run_dir: Path) -> Trained:
    """The checkpoint of a method with nothing to train (same format as every other one)."""
    model = build_method(config)
    path = run_dir / "best.safetensors"
    save_checkpoint(path, method_tensors(model), method_meta(model, "untrained"))
    return Trained(path, Cost(0.0, 0.0), "untrained", "no training")


def write_shared(method: str, source: Path, run_dir: Path) -> Trained:
    """``method``'s checkpoint from the training checkpoint ``source`` of the method it shares
    its training with (``uses_training_of`` in the registry)."""
    model, meta = load_method(source, method=method)
    path = run_dir / "best.safetensors"
    extra = {"source": str(source), "train_state": meta.get("train_state")}
    save_checkpoint(path, method_tensors(model), method_meta(model, "shared", **extra))
    cost = _training_cost(source)
    return Trained(path, cost, "shared", f"training shared with {meta['algorithm']}")


def given_checkpoint(method: str, spec: str, base: Config) -> Trained:
    """A ``--checkpoint METHOD=PATH``, checked against the comparison's episodes."""
    path = resolve_checkpoint(spec)
    meta = read_checkpoint_meta(path)
    held = meta.get("algorithm")
    if held != method and not shares_training(held, method):
        raise ConfigError(
            f"--checkpoint {method}={spec} holds a {held!r} model; pass a {method} checkpoint"
        )
    try:
        config = Config.from_dict(meta.get("config") or {})
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {error}") from None
    check_compatible(method, config, base, path)
    return Trained(path, _training_cost(path), "given")


def shares_training(a: Any, b: str) -> bool:
    """Whether methods ``a`` and ``b`` are built from the same training (one uses the other's)."""
    if not isinstance(a, str) or a not in method_names():
        return False
    return b in (method_entry(a).uses_training_of, a) or method_entry(b).uses_training_of == a


def prepare_methods(
    request: Request,
    log: TextIO | None,
    progress: ComparisonProgress,
    train_images: Callable[[], int],
) -> dict[str, Trained]:
    """A checkpoint for every requested method: given, reused, trained or derived."""
    base = base_config(request)
    runs = request.out / "runs"
    done: dict[str, Trained] = {}
    for method in request.methods:
        entry = method_entry(method)
        with progress.stage(method, "training"):
            if method in request.checkpoints:
                done[method] = given_checkpoint(method, request.checkpoints[method], base)
            elif entry.trains_on is TrainsOn.NOTHING:
                config = method_config(request, method, train_images)
                done[method] = write_untrained(method, config, runs / method)
            elif entry.uses_training_of is not None:
                # The other method's trained network (given, trained above, or trained now).
                owner = entry.uses_training_of
                if owner in request.checkpoints:
                    source = given_checkpoint(owner, request.checkpoints[owner], base)
                elif owner in done:
                    source = done[owner]
                else:
                    config = method_config(request, owner, train_images)
                    source = train_method(owner, config, runs / owner, log)
                done[method] = write_shared(method, source.checkpoint, runs / method)
            else:
                config = method_config(request, method, train_images)
                done[method] = train_method(method, config, runs / method, log)
    return {m: done[m] for m in request.methods}
