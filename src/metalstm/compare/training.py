"""A checkpoint for every method of the comparison: given, reused, trained or derived."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..checkpoint import read_checkpoint_meta, resolve_checkpoint, save_checkpoint
from ..config import Config
from ..errors import CheckpointError, ConfigError
from ..methods import build_method
from ..registry import TrainsOn, method_entry, method_names
from ..serialization import load_method, method_meta, method_tensors
from ..training import resume, train
from .configs import (
    ComparisonProgress,
    base_config,
    check_compatible,
    method_config,
)
from .request import Request, say


@dataclass
class Trained:
    """Where a method's checkpoint came from and what its training cost."""

    checkpoint: Path
    seconds: float | None  # training wall time (None: unknown)
    origin: str  # "trained", "reused", "resumed", "given", "shared", "untrained"
    note: str = ""


def _training_seconds(path: Path) -> float | None:
    """Training wall time recorded in the run's last checkpoint (or in ``path`` itself)."""
    for candidate in (path.parent / "last.safetensors", path):
        try:
            meta = read_checkpoint_meta(candidate)
        except CheckpointError:
            continue
        if candidate != path and meta.get("config") != read_checkpoint_meta(path).get("config"):
            continue  # a last checkpoint of another run
        state = meta.get("train_state")
        if isinstance(state, dict) and isinstance(state.get("elapsed"), int | float):
            return float(state["elapsed"])
    return None


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
        return Trained(best, _training_seconds(best), "reused")
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
    return Trained(best, trainer.state.elapsed, origin)


def write_untrained(method: str, config: Config, run_dir: Path) -> Trained:
    """The checkpoint of a method with nothing to train (same format as every other one)."""
    model = build_method(config)
    path = run_dir / "best.safetensors"
    save_checkpoint(path, method_tensors(model), method_meta(model, "untrained"))
    return Trained(path, 0.0, "untrained", "no training")


def write_shared(method: str, source: Path, run_dir: Path) -> Trained:
    """``method``'s checkpoint from the training checkpoint ``source`` of the method it shares
    its training with (``uses_training_of`` in the registry)."""
    model, meta = load_method(source, method=method)
    path = run_dir / "best.safetensors"
    extra = {"source": str(source), "train_state": meta.get("train_state")}
    save_checkpoint(path, method_tensors(model), method_meta(model, "shared", **extra))
    seconds = _training_seconds(source)
    return Trained(path, seconds, "shared", f"training shared with {meta['algorithm']}")


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
    return Trained(path, _training_seconds(path), "given")


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
