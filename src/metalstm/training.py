"""Meta-training: a plain loop over meta-batches of episodes, with validation and checkpoints.

One update (the paper's Method 1, outer loop):
    episodes = sampler.meta_batch(step, meta_batch, rank, world_size)   # pure in (seed, step)
    loss = mean over episodes of the query loss after adapting           # method-specific
    loss.backward(); all-reduce the meta-gradient across ranks
    skip the update if anything is non-finite; clip the global norm; Adam step.

Everything random is a function of (seed, step), and the checkpoint holds the optimizer state, the
episode counter and the running metrics, so a resumed run continues bit for bit where it stopped.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``last.safetensors`` (and the one before it,
``last.prev.safetensors``), ``best.safetensors`` and, when tensorboard is installed (the
``metalstm[tensorboard]`` extra), event files with the same figures in ``tensorboard/``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import torch

from . import machine
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, save_yaml
from .data import Episode, Episodes, EpisodeSampler
from .data.batches import ClassBatches
from .distributed import Distributed
from .errors import CheckpointError, ConfigError, MetaLSTMError
from .evaluation import candidate_accuracies, episode_batch
from .files import write_file
from .inner_loop import InnerLoopSettings
from .methods import build_method
from .methods.base import Adapter, EpisodeLoss, Method
from .progress import LiveLine
from .registry import BatchSettings, TrainsOn, method_entry
from .runfolder import (
    CONFIG,
    METRICS,
    PRETRAIN,
    TENSORBOARD,
    check_new_run_folder,
    clear_run_folder,
    hold,
    metric_rows,
    read_config_values,
    remove_stale_temporaries,
)
from .serialization import (
    checkpoint_config,
    method_from_tensors,
    method_meta,
    method_tensors,
    optimizer_from_tensors,
    optimizer_tensors,
)
from .util import load_part, resolve_device

# In TrainState.machines: training before this entry ran where nothing recorded it (a checkpoint
# written before the CPU time and machines were), so its CPU time is not known.
UNRECORDED = "(not recorded)"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # meta-updates done
    best_accuracy: float = -1.0
    best_step: int = 0
    validations: list[dict[str, float]] = field(default_factory=list)
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "acc": 0.0, "n": 0.0})
    elapsed: float = 0.0  # seconds of training before this process
    # CPU seconds of training (every thread of the main process) before this process, and where
    # it ran (machine.describe: the CPU, or GPU, and the thread count), in order
    cpu_seconds: float = 0.0
    machines: list[str] = field(default_factory=list)
    stopped: str = ""  # why training ended: "", "completed", "early stopping", "interrupted"


class TrainingStopped(MetaLSTMError):
    """Training could not go on (too many non-finite updates in a row)."""


class Trainer:
    """Meta-trains an :class:`Method` into a run folder. Use :func:`train` for the usual call."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        dist: Distributed | None = None,
        log: TextIO | None = sys.stderr,
    ) -> None:
        self.run_dir = run_dir
        self.dist = dist or Distributed.single()
        self.log = log if self.dist.is_main else None
        self.device = resolve_device(config.device)
        train_data = load_part(config, "train")
        # Settings that depend on the training classes (Method.configure), saved in checkpoints.
        entry = method_entry(config.method)
        config = entry.cls.configure(config, train_data)
        self.config = config
        self.dist.check_same_config(json.dumps(config.to_dict(), sort_keys=True))
        if entry.trains_on is TrainsOn.NOTHING:
            raise ConfigError(
                f"method {config.method!r} has nothing to train; evaluate it directly, or "
                "let `metalstm compare` write its checkpoint"
            )
        self.method = build_method(config).to(self.device)
        if (
            entry.trains_on is TrainsOn.EPISODES
            and config.train_ways != config.n_way
            and not self.method.any_ways()
        ):
            raise ConfigError(
                f"{config.method} has an output layer of n_way={config.n_way} classes, so it "
                f"cannot meta-train on {config.train_ways}-way episodes; set train_n_way="
                f"{config.n_way}"
                + (" or head_init" if isinstance(config.settings, InnerLoopSettings) else "")
            )
        self.optimizer = torch.optim.Adam(self.method.param_groups(), lr=config.lr)
        self.state = TrainState()
        self.total_steps = math.ceil(config.episodes / config.meta_batch)
        self.val_every = max(1, config.val_interval // config.meta_batch)
        self.log_every = max(1, config.log_interval // config.meta_batch)
        # Methods trained on ordinary mini-batches (TrainsOn.BATCHES, with BatchSettings): one
        # update per mini-batch, pretrain_epochs passes; val_interval and log_interval count
        # mini-batches.
        self.batches: ClassBatches | None = None
        if entry.trains_on is TrainsOn.BATCHES:
            settings = config.settings
            assert isinstance(settings, BatchSettings)  # registry.register checks it
            self.batches = ClassBatches(train_data, settings.pretrain_batch, config.seed)
            self.total_steps = self.batches.steps(settings.pretrain_epochs)
            self.val_every = max(1, config.val_interval)
            self.log_every = max(1, config.log_interval)
        self.train_sampler = EpisodeSampler(
            train_data, config.train_ways, config.train_shots, config.q_query, config.seed
        )
        self.val_sampler = EpisodeSampler(
            load_part(config, "val"),
            config.n_way,
            config.k_shot,
            config.eval_queries,
            config.val_seed,
        )
        self._interrupted = False
        self.events: Any = None  # a tensorboard SummaryWriter while run() runs, when installed

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return method_meta(
            self.method,
            "training",
            train_state=asdict(self.state),
            optimizer=self.optimizer.state_dict()["param_groups"],
        )

    def save(self, name: str) -> None:
        if not self.dist.is_main:
            return
        tensors = {**method_tensors(self.method), **optimizer_tensors(self.optimizer)}
        path = self.run_dir / f"{name}.safetensors"
        if name == "last" and path.exists():
            path.replace(self.run_dir / "last.prev.safetensors")
        save_checkpoint(path, tensors, self.checkpoint_meta())

    def restore(self) -> Path | None:
        """Load the newest good checkpoint of the run folder (falling back to the previous one).

        Returns None when the run stopped before its first checkpoint: it then starts afresh.
        Nothing in the folder changes before the checkpoint is found to belong to this config.
        """
        errors = []
        for name in ("last", "last.prev"):
            path = self.run_dir / f"{name}.safetensors"
            if not path.exists():
                continue
            try:
                tensors, meta = load_checkpoint(path, device=self.device)
                self.check_same_run(meta, path)
                state = train_state_from(meta, path)
                self.check_episodes(state)
                method_from_tensors(self.method, tensors, path)
                optimizer_from_tensors(self.optimizer, tensors, meta.get("optimizer"), path)
            except CheckpointError as error:
                errors.append(str(error))
                self.warn(f"{error}; falling back to the previous checkpoint")
                continue
            self.state = state
            self.state.stopped = ""
            self.truncate_metrics()
            return path
        if errors:
            raise CheckpointError(f"no usable checkpoint in {self.run_dir}: {'; '.join(errors)}")
        best = self.run_dir / "best.safetensors"
        if best.exists():
            raise CheckpointError(
                f"{self.run_dir} holds {best.name} but no last.safetensors to resume from, and "
                f"starting over would replace it; evaluate it with --checkpoint {best}, or start "
                "a new run with another --out"
            )
        self.truncate_metrics()
        return None

    def check_same_run(self, meta: dict[str, Any], path: Path) -> None:
        """Refuse a config.yaml that was edited after the checkpoint (episodes may grow)."""
        config = meta.get("config")
        device = config.get("device", "auto") if isinstance(config, dict) else "auto"
        saved = checkpoint_config(meta, path, {}, device).to_dict()
        ours = self.config.to_dict()
        differ = [key for key in ours if key != "episodes" and ours[key] != saved[key]]
        if differ:
            changes = ", ".join(
                f"{key}={ours[key]!r} (checkpoint: {saved[key]!r})" for key in differ
            )
            raise ConfigError(
                f"{self.run_dir / CONFIG} disagrees with {path.name}: {changes}; restore "
                "config.yaml, or start a new run with --out"
            )

    def check_episodes(self, state: TrainState) -> None:
        """Refuse an ``episodes`` below what the run has already done."""
        done = state.step * self.config.meta_batch
        if self.batches is None and self.config.episodes < done:
            raise ConfigError(
                f"episodes={self.config.episodes} is fewer than the {done} episodes "
                f"{self.run_dir} has already done; give --episodes {done} or more"
            )

    def truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint, so a resumed run rewrites them."""
        path = self.run_dir / METRICS
        if not path.exists() or not self.dist.is_main:
            return
        kept = [line for line, row in metric_rows(path) if row["step"] <= self.state.step]
        write_file(path, "".join(line + "\n" for line in kept))

    # -- logging ---------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.log is not None:
            print(message, file=self.log, flush=True)

    def warn(self, message: str) -> None:
        """Warnings reach stderr even when the progress output is off."""
        if self.dist.is_main:
            print(f"metalstm: warning: {message}", file=sys.stderr, flush=True)

    def write_metrics(self, row: dict[str, Any]) -> None:
        """Append a row to metrics.jsonl and mirror its figures to tensorboard (train/*, val/*)."""
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.events is not None:
            group = "val" if "val_accuracy" in row else "train"
            for key, value in row.items():
                if key not in ("step", "episodes") and isinstance(value, (int, float)):
                    tag = f"{group}/{key.removeprefix('val_')}"
                    self.events.add_scalar(tag, value, row["step"])

    # -- the loop --------------------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        """The meta learning rate of update ``step`` (0-based): linear warm-up over
        ``lr_warmup`` updates, then constant or cosine-annealed to 0 at the last update."""
        cfg = self.config
        lr = cfg.lr
        if cfg.lr_schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * step / self.total_steps))
        if step < cfg.lr_warmup:
            lr *= (step + 1) / (cfg.lr_warmup + 1)
        return lr

    def update(self, step: int) -> tuple[float, float]:
        """One meta-update on this rank's share of the meta-batch; returns (loss, accuracy)."""
        cfg = self.config
        items: list[Callable[[], EpisodeLoss]]
        if self.batches is not None:  # one ordinary mini-batch, split over the ranks
            shares = self.dist.world_size
            images, labels = self.batches.batch(step, self.dist.rank, self.dist.world_size)
            images, labels = images.to(self.device), labels.to(self.device)
            items = [lambda: self.method.batch_loss(images, labels)]
        else:
            shares = cfg.meta_batch
            episodes = self.train_sampler.meta_batch(
                step, cfg.meta_batch, self.dist.rank, self.dist.world_size
            )
            episodes = [e.to(self.device) for e in episodes]
            items = [
                partial(self.method.meta_loss, e) for e in episode_items(self.method, episodes)
            ]
        loss, acc, finite = meta_gradient(
            self.method, self.optimizer, items, shares, self.dist, cfg.clip_grad_norm
        )
        if not finite:
            self.skip_update()
            return float("nan"), acc
        self.state.nonfinite_streak = 0
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step) * group.get("lr_scale", 1.0)
        self.optimizer.step()
        return loss, acc

    def skip_update(self) -> None:
        """A non-finite loss or meta-gradient never reaches the meta-parameters."""
        self.optimizer.zero_grad(set_to_none=False)
        self.state.nonfinite_total += 1
        self.state.nonfinite_streak += 1
        if self.state.nonfinite_streak >= self.config.max_nonfinite:
            raise TrainingStopped(
                f"{self.state.nonfinite_streak} non-finite updates in a row at update "
                f"{self.state.step}; lower lr or clip_grad_norm, or check the data"
            )

    def validate(self) -> float:
        # Through the method's hook, which may choose evaluation settings among candidates.
        return self.method.validate(self.validation_scores)

    def validation_scores(self, adapt: Adapter) -> list[float]:
        """Mean accuracy, on the fixed validation episodes, of each classifier ``adapt`` returns
        (episodes sharded over the ranks, gathered so every rank gets the same figures)."""
        count = self.config.val_episodes
        # the method's own classifier goes through batches of episodes where it takes them
        block = episode_batch(self.method) if adapt == self.method.adapt_one else 1
        indices = self.dist.shard_episodes(count, block)
        scores = candidate_accuracies(
            self.method, self.val_sampler, indices, adapt, self.log, "validation episode", block
        )
        per_episode = self.dist.gather_episodes(scores, count, block)  # [episodes][candidates]
        return [sum(column) / count for column in zip(*per_episode, strict=True)]

    def run(self) -> TrainState:
        state, cfg = self.state, self.config
        if state.step == 0:
            self.pretrain()
        start = time.perf_counter() - state.elapsed
        cpu_start = time.process_time() - state.cpu_seconds
        if state.step > 0 and not state.machines:
            state.machines.append(UNRECORDED)  # resumed from a checkpoint that predates the record
        here = machine.describe(self.device)
        if state.machines[-1:] != [here]:
            state.machines.append(here)
        progress = Progress(self.total_steps, cfg.meta_batch, state.step, self.log)
        if self.dist.is_main:
            self.events = open_tensorboard(self.run_dir, first_step=state.step + 1)
        with catch_sigint(self):
            while state.step < self.total_steps and not state.stopped:
                loss, acc = self.update(state.step)
                state.step += 1
                if math.isfinite(loss):
                    state.window["loss"] += loss
                    state.window["acc"] += acc
                    state.window["n"] += 1
                state.elapsed = time.perf_counter() - start
                state.cpu_seconds = time.process_time() - cpu_start
                if state.step % self.log_every == 0 or state.step == self.total_steps:
                    self.log_window()
                if state.step % self.val_every == 0 or state.step == self.total_steps:
                    self.validation_round()
                progress.update(state, loss, acc)
                if self._interrupted and not state.stopped:
                    state.stopped = "interrupted"
            if not state.stopped:
                state.stopped = "completed"
            self.save("last")
        progress.close()
        if self.events is not None:
            self.events.close()
            self.events = None
        return state

    def pretrain(self) -> None:
        """The phase the method asks for before meta-training (:meth:`Method.pretraining`), as a
        run of its own in ``RUN/pretrain``: started, resumed where a killed run left it, or
        reused once finished; the method then starts from what it learned."""
        phase = self.method.pretraining()
        if phase is None:
            return
        folder = self.run_dir / PRETRAIN
        if (folder / CONFIG).exists():
            self.say(f"pre-training: continuing (or reusing) {folder}")
            trainer = resume(folder, dist=self.dist, log=self.log)
        else:
            self.say(f"pre-training ({phase.method}) in {folder}")
            trainer = train(phase, folder, dist=self.dist, log=self.log)
        self.method.start_from(trainer.method)

    def log_window(self) -> None:
        state, window = self.state, self.state.window
        n = max(window["n"], 1.0)
        self.write_metrics(
            {
                "step": state.step,
                "episodes": state.step * self.config.meta_batch,
                "loss": window["loss"] / n if window["n"] else None,
                "accuracy": window["acc"] / n if window["n"] else None,
                "lr": self.learning_rate(state.step - 1),
                "nonfinite": state.nonfinite_total,
            }
        )
        state.window = {"loss": 0.0, "acc": 0.0, "n": 0.0}

    def weights_finite(self) -> bool:
        """Whether every meta-parameter is finite; a diverged model is never saved as best."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.method.parameters())
        if not finite:
            self.warn(f"non-finite meta-parameters at update {self.state.step}: not saved as best")
        return finite

    def validation_round(self) -> None:
        state = self.state
        val_acc = self.validate()
        state.validations.append({"step": state.step, "accuracy": val_acc})
        self.write_metrics({"step": state.step, "val_accuracy": val_acc})
        if val_acc > state.best_accuracy and self.weights_finite():
            state.best_accuracy, state.best_step = val_acc, state.step
            self.save("best")
        elif self.config.early_stopping:
            since = sum(1 for v in state.validations if v["step"] > state.best_step)
            if since >= self.config.early_stopping:
                state.stopped = "early stopping"
        self.save("last")


class Progress:
    """The live line of a training run: episodes/s, ETA, loss, accuracy and validation.

    Written through :class:`~metalstm.progress.LiveLine`; off a terminal, a line every 10 s
    (metrics.jsonl holds the figures of every ``log_interval``).
    """

    def __init__(self, total: int, meta_batch: int, start: int, out: TextIO | None) -> None:
        self.meta_batch = meta_batch
        self.line = LiveLine(out, total, start=start, every_fraction=0.0, every_seconds=10.0)
        self.loss, self.acc = float("nan"), float("nan")

    def update(self, state: TrainState, loss: float, acc: float) -> None:
        if math.isfinite(loss):  # exponential moving averages of the training figures
            fresh = not math.isfinite(self.loss)
            self.loss = loss if fresh else 0.95 * self.loss + 0.05 * loss
            self.acc = acc if fresh else 0.95 * self.acc + 0.05 * acc
        self.line.update(state.step, lambda: self.text(state))

    def text(self, state: TrainState) -> str:
        if state.validations:  # before the first validation there is nothing to show
            last = 100 * state.validations[-1]["accuracy"]
            val = f"val {last:.1f}% (best {100 * state.best_accuracy:.1f}%)"
        else:
            val = "val -"
        return (
            f"episode {state.step * self.meta_batch}/{self.line.total * self.meta_batch} | "
            f"{self.line.rate() * self.meta_batch:.1f} episodes/s | "
            f"{self.line.timing()} | loss {self.loss:.3f} | "
            f"acc {100 * self.acc:.1f}% | {val} | skipped {state.nonfinite_total}"
        )

    def close(self) -> None:
        self.line.close()


def meta_gradient(
    method: Method,
    optimizer: torch.optim.Optimizer,
    items: Sequence[Callable[[], EpisodeLoss]],
    shares: int,
    dist: Distributed,
    clip: float,
) -> tuple[float, float, bool]:
    """The clipped meta-gradient of one update in the parameters' ``.grad``: each item (an
    episode's or a mini-batch's loss) is backpropagated on its own into a row, the rows of every
    rank are summed in slot order (:meth:`Distributed.sum_gradients`: the same bits for any
    number of processes), divided by ``shares``. Returns (loss, accuracy, finite); the caller
    steps the optimiser only when finite. ``metalstm bench`` times exactly this."""
    params = list(method.parameters())
    rows = []
    for item in items:
        optimizer.zero_grad(set_to_none=False)
        out = item()
        (out.loss / shares).backward()
        rows.append(gradient_row(params, out.loss, out.accuracy))
    stats = dist.sum_gradients(params, torch.stack(rows))
    loss, acc = (stats.double() / shares).tolist()
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    return loss, acc, math.isfinite(loss) and bool(torch.isfinite(norm))


def episode_items(method: Method, episodes: list[Episode]) -> list[Episode | Episodes]:
    """A meta-batch share's episodes as the items of :func:`meta_gradient`: in batches of
    ``episode_batch`` (the last may be smaller; one alone is an episode) where the method
    takes them (:func:`~metalstm.evaluation.episode_batch`), else one by one."""
    size = episode_batch(method)
    chunks = [episodes[i : i + size] for i in range(0, len(episodes), size)]
    return [Episodes.of(chunk) for chunk in chunks]


def gradient_row(
    params: list[torch.nn.Parameter], loss: torch.Tensor, accuracy: float
) -> torch.Tensor:
    """One item's flat gradient of ``params`` (zeros where a parameter got none), then its loss
    and accuracy: a row for :meth:`Distributed.sum_gradients`."""
    parts = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    stats = torch.stack([loss.detach(), loss.new_tensor(accuracy)]).to(parts[0])
    return torch.cat([g.reshape(-1) for g in parts] + [stats])


@contextmanager
def catch_sigint(trainer: Trainer) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM finishes the current update, writes a checkpoint and stops.

    A second one stops at once, as without this handler (the last checkpoint stays): the first
    waits for the end of an update, and a long validation round (a method choosing its
    evaluation settings) may hold that back for many minutes.
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: object) -> None:
        if trainer._interrupted:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        trainer._interrupted = True
        trainer.say(
            "\ninterrupt: stopping after this update and writing a checkpoint (again: stop now)"
        )

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def open_tensorboard(run_dir: Path, *, first_step: int) -> Any:
    """A SummaryWriter on ``run_dir/tensorboard`` when tensorboard is installed, else None.

    Events at ``first_step`` and later, left by a run killed after its last checkpoint, are
    purged, so a resumed run's curves match its metrics.jsonl.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(run_dir / TENSORBOARD), purge_step=first_step)


def train(
    config: Config,
    run_dir: str | Path,
    *,
    force: bool = False,
    dist: Distributed | None = None,
    log: TextIO | None = sys.stderr,
) -> Trainer:
    """Meta-train a new run in ``run_dir``. Returns the finished :class:`Trainer`.

    Example::

        from metalstm import load_preset, override, train
        trainer = train(override(load_preset("omniglot-5w1s"), {"episodes": 500}), "runs/x")
        print(trainer.state.best_accuracy)
    """
    run_dir = Path(run_dir)
    dist = dist or Distributed.single()
    if dist.is_main:
        check_new_run_folder(run_dir, force=force)
    trainer = Trainer(config, run_dir, dist=dist, log=log)  # checks the config against the data
    with hold_if_main(run_dir, dist):
        if dist.is_main:
            check_new_run_folder(run_dir, force=force)  # again, now that the folder is ours
            clear_run_folder(run_dir)
            write_file(run_dir / CONFIG, save_yaml(config))
        dist.barrier()
        trainer.run()
    return trainer


def resume(
    run_dir: str | Path,
    *,
    episodes: int | None = None,
    dist: Distributed | None = None,
    log: TextIO | None = sys.stderr,
) -> Trainer:
    """Continue the run in ``run_dir`` from its last good checkpoint (``episodes`` extends it)."""
    run_dir = Path(run_dir)
    dist = dist or Distributed.single()
    config = saved_config(run_dir)
    if episodes is not None:
        config = Config.from_dict({**config.to_dict(), "episodes": episodes})
    with hold_if_main(run_dir, dist):
        trainer = Trainer(config, run_dir, dist=dist, log=log)
        path = trainer.restore()
        if trainer.dist.is_main:
            write_file(run_dir / CONFIG, save_yaml(config))
            remove_stale_temporaries(run_dir)
        if path is None:
            trainer.say(f"{run_dir} has no checkpoint yet: starting the run from the beginning")
        else:
            episode = trainer.state.step * config.meta_batch
            trainer.say(f"resuming {run_dir} from {path.name} at episode {episode}")
        trainer.run()
    return trainer


def saved_config(run_dir: Path) -> Config:
    """The config in ``run_dir/config.yaml``, checked like any other."""
    return Config.from_dict(read_config_values(run_dir))


@contextmanager
def hold_if_main(run_dir: Path, dist: Distributed) -> Iterator[None]:
    """The run folder's lock (:func:`metalstm.runfolder.hold`), taken by the main rank only."""
    if not dist.is_main:
        yield
        return
    with hold(run_dir):
        yield


def train_state_from(meta: dict[str, Any], path: Path) -> TrainState:
    """The :class:`TrainState` of a checkpoint's meta, or a one-line :class:`CheckpointError`."""
    values = meta.get("train_state")
    try:
        if not isinstance(values, dict):
            raise TypeError("not a mapping")
        state = TrainState(**values)
        if type(state.step) is not int or state.step < 0:
            raise TypeError("step is not a count")
        if not all(type(t) in (int, float) for t in (state.elapsed, state.cpu_seconds)):
            raise TypeError("elapsed or cpu_seconds is not a number of seconds")
        if not isinstance(state.machines, list) or not all(
            isinstance(m, str) for m in state.machines
        ):
            raise TypeError("machines is not a list of names")
    except TypeError as error:
        raise CheckpointError(f"checkpoint {path} has a malformed train_state ({error})") from None
    return state
