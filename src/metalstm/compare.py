"""``metalstm compare``: the paper's comparison table, every method on the same fixed test episodes.

For a preset (say ``omniglot-5w1s``) and a list of methods (:data:`METHODS`), this

1. trains what needs training, each method in ``OUT/runs/METHOD`` through the shared
   :class:`~metalstm.training.Trainer` (a finished run there with the same config is reused, an
   interrupted one resumed), unless ``--checkpoint METHOD=PATH`` gives its checkpoint.
   ``nn-embedding`` reuses the ``finetune`` pre-training; ``nn-pixel`` has nothing to train;
2. evaluates every method on the *same* fixed test episodes, drawing them through one recording
   sampler per method and checking that the episodes each method saw (classes and image ids)
   hash to the same fingerprint (:func:`metalstm.data.episodes_fingerprint`);
3. writes ``OUT/results.md`` (Markdown table: mean ± 95% CI, episodes, training wall time,
   published figure; protocol line and command), ``results.csv``, ``results.json`` (with every
   per-episode accuracy) and ``results.png`` (bar chart, error bars = 95% CI).

Methods come from the registry (:mod:`metalstm.registry`), in its order. Settings: the preset,
then the method's recipe (registered with the method), then ``--set key=value`` (every
method), then ``--set METHOD:key=value`` (one method), then ``--train-episodes``. Every method's
checkpoint also works with ``metalstm evaluate --checkpoint``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from .checkpoint import read_checkpoint_meta, resolve_checkpoint, save_checkpoint
from .config import Config, load_preset, override
from .data import ClassImages, Episode, EpisodeSampler, episodes_fingerprint, fixed_episodes
from .errors import CheckpointError, ConfigError, MetaLSTMError
from .evaluation import EvalResult, Protocol, evaluate, load_part
from .files import write_file
from .methods import build_method
from .methods.base import NO_BATCHNORM, Method, episode_batchnorm
from .progress import Surrounding, format_seconds, surrounding
from .registry import BatchSettings, TrainsOn, method_entry, method_names
from .serialization import load_method, method_meta, method_tensors
from .training import resolve_device, resume, train


# -- arguments -------------------------------------------------------------------------------------
def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``metalstm compare``."""
    parser.add_argument("--preset", required=True, help="named preset (see metalstm presets)")
    parser.add_argument(
        "--methods",
        default="all",
        help="comma-separated methods, or all (every registered method; see metalstm methods)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for runs and results")
    parser.add_argument(
        "--checkpoint",
        metavar="METHOD=PATH",
        action="append",
        default=[],
        help="use this checkpoint for METHOD instead of training it (repeatable)",
    )
    parser.add_argument("--episodes", type=int, help="test episodes (default: 600)")
    parser.add_argument("--seed", type=int, help="seed of the fixed test episodes (default: 0)")
    parser.add_argument(
        "--set",
        metavar="[METHOD:]KEY=VALUE",
        action="append",
        default=[],
        help="override a config field for every method, or for METHOD only",
    )
    parser.add_argument(
        "--train-episodes",
        type=int,
        metavar="N",
        help="training length of every method: N episodes (N mini-batches when pre-training)",
    )
    parser.add_argument("--data-root", help="data folder (default: $METALSTM_DATA)")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines (training and evaluation)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


@dataclass(frozen=True)
class Request:
    """A parsed ``metalstm compare`` command."""

    preset: str
    methods: tuple[str, ...]
    out: Path
    checkpoints: dict[str, str]
    episodes: int | None = None
    seed: int | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    train_episodes: int | None = None
    data_root: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Request:
        overrides: dict[str, str] = {}
        per_method: dict[str, dict[str, str]] = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r} is not of the form [METHOD:]key=value")
            method, colon, key = key.strip().rpartition(":")
            if colon:
                check_method(method)
                per_method.setdefault(method, {})[key.strip()] = value.strip()
            else:
                overrides[key.strip()] = value.strip()
        checkpoints = {}
        for item in args.checkpoint:
            method, sep, path = item.partition("=")
            if not sep or not path.strip():
                raise ConfigError(f"--checkpoint {item!r} is not of the form METHOD=PATH")
            checkpoints[check_method(method.strip())] = path.strip()
        for name, value in (
            ("--episodes", args.episodes),
            ("--train-episodes", args.train_episodes),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value} must be 1 or more")
        if args.seed is not None and args.seed < 0:
            raise ConfigError(f"--seed {args.seed} must be 0 or more")
        return cls(
            preset=args.preset,
            methods=parse_methods(args.methods),
            out=Path(args.out),
            checkpoints=checkpoints,
            episodes=args.episodes,
            seed=args.seed,
            overrides=overrides,
            method_overrides=per_method,
            train_episodes=args.train_episodes,
            data_root=args.data_root,
        )

    def command(self) -> str:
        """The ``metalstm compare`` command line that reproduces this request."""
        words = ["metalstm", "compare", "--preset", self.preset]
        words += ["--methods", ",".join(self.methods), "--out", str(self.out)]
        if self.episodes is not None:
            words += ["--episodes", str(self.episodes)]
        if self.seed is not None:
            words += ["--seed", str(self.seed)]
        if self.train_episodes is not None:
            words += ["--train-episodes", str(self.train_episodes)]
        for key, value in self.overrides.items():
            words += ["--set", f"{key}={value}"]
        for method, values in self.method_overrides.items():
            words += [w for k, v in values.items() for w in ("--set", f"{method}:{k}={v}")]
        for method, path in self.checkpoints.items():
            words += ["--checkpoint", f"{method}={path}"]
        return shlex.join(words)


def check_method(name: str) -> str:
    if name not in method_names():
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())} (or all)")
    return name


def parse_methods(text: str) -> tuple[str, ...]:
    """``all`` or a comma-separated list of method names, in the table's order, no repeats."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--methods is empty; give all or a list like protonet,maml")
    if names == ["all"]:
        return method_names()
    chosen = {check_method(n) for n in names}
    return tuple(m for m in method_names() if m in chosen)


# -- configs ---------------------------------------------------------------------------------------
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
    """The training config of ``method``: preset, recipe, --set, --set METHOD:, --train-episodes."""
    base = base_config(request)
    config = override(base, {"method": method, **method_entry(method).recipe(base)})
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
                f"but the comparison uses {key}={getattr(base, key)!r}; pass a matching checkpoint"
            )


# -- progress --------------------------------------------------------------------------------------
class ComparisonProgress:
    """The comparison's own status in front of every progress line of its training and evaluation
    runs: ``method 3/9 (matching) | comparison ETA ~41m | episode 200/5000 | ...``.

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
    mini-batches) of every method trained here, and its test episodes. A run found finished
    turns out to need none."""
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
    return planned


def train_image_count(base: Config) -> Callable[[], int]:
    """The number of training images, loaded on the first call only (when it is needed)."""
    images: list[int] = []

    def train_images() -> int:
        if not images:
            images.append(int(load_part(base, "train").class_count.sum()))
        return images[0]

    return train_images


# -- training --------------------------------------------------------------------------------------
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


# -- evaluation ------------------------------------------------------------------------------------
class RecordingSampler(EpisodeSampler):
    """An :class:`EpisodeSampler` that remembers the identity of every episode it hands out."""

    def __init__(self, data: ClassImages, n_way: int, k_shot: int, q_query: int, seed: int):
        super().__init__(data, n_way, k_shot, q_query, seed)
        self.served: list[Episode] = []

    def episode(self, step: int, slot: int = 0) -> Episode:
        episode = super().episode(step, slot)
        empty = episode.support_x.new_empty(0)
        self.served.append(
            Episode(
                support_x=empty,
                support_y=episode.support_y,
                query_x=empty,
                query_y=episode.query_y,
                classes=episode.classes,
                support_ids=episode.support_ids,
                query_ids=episode.query_ids,
            )
        )
        return episode

    def fingerprint(self) -> str:
        """Fingerprint of the episodes served so far (classes and image rows)."""
        return episodes_fingerprint(self.served)


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


def method_notes(algorithm: Method, trained: Trained, protocol: Protocol, base: Config) -> str:
    """A short description of the settings behind a method's number: its test-time adaptation,
    its batch-norm statistics where they are not the protocol line's, its training."""
    notes = [protocol.adaptation] if protocol.adaptation else []
    if protocol.bn_mode not in (episode_batchnorm(base.transductive), NO_BATCHNORM):
        notes.append(f"BN: {protocol.bn_mode}")
    if method_entry(algorithm.name).trains_on is TrainsOn.EPISODES:
        notes.append(f"{algorithm.config.episodes} training episodes")
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


# -- reports ---------------------------------------------------------------------------------------
def protocol_line(base: Config, fingerprint: str) -> str:
    mode = "transductive" if base.transductive else "non-transductive (support statistics)"
    return (
        f"{base.dataset}/{base.split} test classes, {base.n_way}-way {base.k_shot}-shot, "
        f"{base.eval_queries} queries per class, {base.test_episodes} fixed episodes "
        f"(seed {base.test_seed}, fingerprint {fingerprint[:16]}), identical for every method; "
        f"BN at test: {mode}; accuracy = mean ± 1.96·std/√E"
    )


def _seconds(value: float | None) -> str:
    return "—" if value is None else format_seconds(value)


def markdown(results: Sequence[MethodResult], request: Request, base: Config, fp: str) -> str:
    lines = [
        f"# Few-shot comparison: {request.preset}",
        "",
        f"Protocol: {protocol_line(base, fp)}.",
        "",
        "| Method | Accuracy (%) | Episodes | Training time | Published (%) | Notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        published = "—" if r.published is None else f"{r.published:.2f}"
        lines.append(
            f"| {r.title} (`{r.method}`) | {100 * r.result.mean:.2f} ± {100 * r.result.ci95:.2f} "
            f"| {len(r.result.accuracies)} | {_seconds(r.trained.seconds)} | {published} "
            f"| {r.notes} |"
        )
    lines += [
        "",
        f"Command: `{request.command()}`",
        "",
        "Training time: wall time of each method's training run on this machine (validation "
        "included); `—` when unknown. Published: the figure quoted in the project's SPEC for "
        "this dataset and N-way K-shot setting, for reference only (other budgets and protocols).",
        "",
    ]
    return "\n".join(lines)


CSV_FIELDS = (
    "method",
    "title",
    "accuracy",
    "ci95",
    "episodes",
    "train_seconds",
    "eval_seconds",
    "published",
    "notes",
    "checkpoint",
    "fingerprint",
)


def csv_text(results: Sequence[MethodResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = r.to_json()
        writer.writerow({k: row[k] for k in CSV_FIELDS})
    return buffer.getvalue()


def results_json(
    results: Sequence[MethodResult], request: Request, base: Config, fingerprint: str, data: str
) -> dict[str, Any]:
    return {
        "preset": request.preset,
        "command": request.command(),
        "protocol": protocol_line(base, fingerprint),
        "dataset": base.dataset,
        "split": base.split,
        "n_way": base.n_way,
        "k_shot": base.k_shot,
        "q_query": base.eval_queries,
        "episodes": base.test_episodes,
        "seed": base.test_seed,
        "transductive": base.transductive,
        "fingerprint": fingerprint,
        "test_images_sha256": data,
        "methods": [r.to_json() for r in results],
    }


def plot(results: Sequence[MethodResult], out: Path, title: str, n_way: int) -> Path:
    """Bar chart of the accuracies with 95% CI error bars (published figures as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(results) + 4.0, 4.2))
    x = list(range(len(results)))
    means = [100 * r.result.mean for r in results]
    errors = [100 * r.result.ci95 if r.result.ci95 == r.result.ci95 else 0.0 for r in results]
    ax.bar(x, means, yerr=errors, capsize=4, color="#4c72b0", label="this run (95% CI)")
    marked = [(i, r.published) for i, r in enumerate(results) if r.published is not None]
    if marked:
        ax.scatter(
            [i for i, _ in marked],
            [p for _, p in marked],
            marker="_",
            s=600,
            color="#c44e52",
            zorder=3,
            label="published",
        )
    ax.axhline(100 / n_way, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(x, [r.method for r in results], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        write_file(out, lambda handle: fig.savefig(handle, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return out


def say(log: TextIO | None, message: str) -> None:
    if log is not None:
        print(message, file=log, flush=True)


# -- entry points ----------------------------------------------------------------------------------
def compare(request: Request, log: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Train, evaluate and report; returns the content of ``results.json``."""
    if request.out.exists() and not request.out.is_dir():
        raise ConfigError(f"--out {request.out} is a file; give a folder")
    train_images = train_image_count(base_config(request))  # fails early on a bad preset or --set
    progress = ComparisonProgress(request.methods, planned_work(request, train_images))
    trained = prepare_methods(request, log, progress, train_images)
    results, fingerprint, base = evaluate_methods(request, trained, log, progress)
    test = load_part(base, "test")
    data_digest = hashlib.sha256(test.images.numpy().tobytes()).hexdigest()
    payload = results_json(results, request, base, fingerprint, data_digest)
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "results.md", markdown(results, request, base, fingerprint))
    write_file(out / "results.csv", csv_text(results))
    write_file(out / "results.json", json.dumps(payload, indent=2) + "\n")
    title = (
        f"{request.preset}: {base.n_way}-way {base.k_shot}-shot, "
        f"{base.test_episodes} identical test episodes"
    )
    plot(results, out / "results.png", title, base.n_way)
    return payload


def compare_main(args: argparse.Namespace) -> None:
    """``metalstm compare``: prints the Markdown table (or the JSON with ``--json``)."""
    request = Request.from_args(args)
    payload = compare(request, log=None if args.quiet else sys.stderr)
    if args.json:
        print(json.dumps(payload))
    else:
        print((request.out / "results.md").read_text(), end="")
        print(f"written: {', '.join(str(request.out / f) for f in RESULT_FILES)}")


RESULT_FILES = ("results.md", "results.csv", "results.json", "results.png")
