"""Typed configuration: one flat dataclass, named presets stored as YAML, ``key=value`` overrides.

A :class:`Config` says everything about a run: the data, the episodes, the learner, the algorithm
and its meta-training. It is frozen; :func:`override` returns a new one. Presets live in
``metalstm/presets/NAME.yaml`` and only list the fields that differ from the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Config:
    """Settings of a run; defaults follow Ravi & Larochelle (2017) where the paper fixes them."""

    # -- data ------------------------------------------------------------------------------------
    dataset: str = "omniglot"  # omniglot | miniimagenet | folder
    split: str = "vinyals"  # omniglot: vinyals | lake; miniimagenet: ravi; folder: unused
    data_root: str | None = None  # default: $METALSTM_DATA, then the per-user cache folder
    image_size: int = 28
    channels: int = 1
    # -- episodes (N-way K-shot, Q queries per class) ---------------------------------------------
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15  # queries per class of meta-training episodes
    eval_q_query: int | None = None  # of validation and test episodes; None = q_query
    # -- learner: 4 x [conv3x3(filters), BN, ReLU, maxpool2] + linear ----------------------------
    filters: int = 32
    bn_momentum: float = 0.9  # weight of the new batch in the running statistics
    bn_eps: float = 1e-5
    # -- algorithm ---------------------------------------------------------------------------------
    algorithm: str = "lstm"
    hidden_size: int = 20  # layer-1 LSTM of the meta-learner
    preprocess_p: float = 10.0  # Andrychowicz et al. (2016) gradient preprocessing
    inner_steps: int = 12  # T: updates of the learner on the support set
    eval_inner_steps: int | None = None  # T at evaluation; None = inner_steps
    second_order: bool = False  # differentiate through the learner's gradients
    grad_divide_batch: bool = False  # authors' quirk: divide the mean gradient by the batch size
    train_query_bn: str = "batch"  # BN of the query pass while meta-training: batch (the authors')
    #                                | support (the support passes' running statistics, as at test)
    # -- meta-training -----------------------------------------------------------------------------
    episodes: int = 50_000  # meta-training episodes (updates = episodes / meta_batch)
    meta_batch: int = 1  # episodes per meta-update (the paper: 1)
    lr: float = 1e-3  # Adam
    lr_schedule: str = "constant"  # constant | cosine
    clip_grad_norm: float = 0.25  # global norm of the meta-gradient
    val_interval: int = 1000  # episodes between validations
    val_episodes: int = 100
    val_seed: int = 1
    early_stopping: int = 0  # stop after this many validations without improvement (0 = never)
    max_nonfinite: int = 20  # stop after this many non-finite updates in a row
    log_interval: int = 50  # episodes between metric lines
    seed: int = 0
    # -- comparison methods (metalstm.algorithms; recipes per method in metalstm.compare) --------
    maml_inner_lr: float = 0.4  # maml / maml-fo: inner SGD step α (steps: inner_steps, eval_...)
    fce_steps: int = 5  # matching-fce: processing steps K of the query's attention LSTM
    pretrain_classes: int = 0  # finetune / nn-embedding: outputs of the pre-trained classifier;
    #                            0 = every training class (the Trainer fills it in from the data)
    pretrain_epochs: float = 10.0  # finetune / nn-embedding: passes over the training images
    pretrain_batch: int = 64  # finetune / nn-embedding: images per pre-training mini-batch
    finetune_lr_grid: str = "0.01,0.1,0.5"  # finetune: SGD learning rates tried on validation
    finetune_steps_grid: str = "10,50,100"  # finetune: SGD step counts tried on validation
    # -- evaluation --------------------------------------------------------------------------------
    test_episodes: int = 600
    test_seed: int = 0
    transductive: bool = False  # query BN statistics from the query batch instead of the support
    # -- execution ---------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the meta-learner step (falls back to eager if it fails)

    def __post_init__(self) -> None:
        checks = {
            "image_size": self.image_size >= 16,
            "channels": self.channels in (1, 3),
            "n_way": self.n_way >= 2,
            "k_shot": self.k_shot >= 1,
            "q_query": self.q_query >= 1,
            "filters": self.filters >= 1,
            "inner_steps": self.inner_steps >= 1,
            "episodes": self.episodes >= 1,
            "meta_batch": self.meta_batch >= 1,
            "lr": self.lr > 0,
            "clip_grad_norm": self.clip_grad_norm > 0,
            "val_interval": self.val_interval >= 1,
            "val_episodes": self.val_episodes >= 1,
            "test_episodes": self.test_episodes >= 1,
            "bn_momentum": 0.0 < self.bn_momentum <= 1.0,
            "lr_schedule": self.lr_schedule in ("constant", "cosine"),
            "train_query_bn": self.train_query_bn in ("batch", "support"),
            "max_nonfinite": self.max_nonfinite >= 1,
            "log_interval": self.log_interval >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid value {key}={getattr(self, key)!r}")
        for key in ("eval_inner_steps", "eval_q_query"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"invalid value {key}={value!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"invalid value {f.name}={value!r}; give a finite number")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Upper bounds, so that no config (typed, edited or in a checkpoint) can allocate
        without limit: each size on its own, and θ, computed from them before anything is built."""
        for key, limit in SIZE_LIMITS.items():
            value = getattr(self, key)
            if value is not None and value > limit:
                raise ConfigError(f"invalid value {key}={value!r}; at most {limit} is supported")
        size = learner_size(self)
        if size > MAX_LEARNER_SIZE:
            raise ConfigError(
                f"a learner of {size:,} parameters (filters={self.filters}, "
                f"image_size={self.image_size}, n_way={self.n_way}) is more than the "
                f"{MAX_LEARNER_SIZE:,} supported; lower filters, image_size or n_way"
            )

    @property
    def test_steps(self) -> int:
        """Inner steps at evaluation (defaults to the training value)."""
        return self.eval_inner_steps or self.inner_steps

    @property
    def train_query_batch_stats(self) -> bool:
        """Whether the meta-training query pass normalises with its own batch statistics."""
        return self.train_query_bn == "batch"

    @property
    def test_queries(self) -> int:
        """Queries per class of validation and test episodes (defaults to the training value)."""
        return self.eval_q_query or self.q_query

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Build from a mapping, checking every key and value type."""
        return override(cls(), values)


SIZE_LIMITS = {
    "image_size": 512,
    "filters": 512,
    "n_way": 1000,
    "k_shot": 1000,
    "q_query": 1000,
    "eval_q_query": 1000,
    "hidden_size": 1024,
    "inner_steps": 10_000,
    "eval_inner_steps": 10_000,
    "meta_batch": 10_000,
    "val_episodes": 1_000_000,
    "test_episodes": 1_000_000,
    "fce_steps": 10_000,
    "pretrain_batch": 100_000,
    "pretrain_classes": 100_000,
}
MAX_LEARNER_SIZE = 5_000_000  # θ of the conv-4 learner; the Omniglot and miniImageNet ones: ~30 k


def learner_size(config: Config) -> int:
    """Parameters of the conv-4 learner (:class:`metalstm.learner.ConvNet`), by arithmetic."""
    side, c_in, total = config.image_size, config.channels, 0
    for _ in range(4):
        # conv weight and bias, BN scale and shift
        total += 9 * c_in * config.filters + 3 * config.filters
        side, c_in = side // 2, config.filters
    return total + (config.filters * side * side + 1) * config.n_way


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert ``value`` (from YAML or the command line) to the type of field ``key``."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise ConfigError(f"{key} cannot be empty; give a {options[0].__name__}")
    for option in options:
        if option is type(None):
            continue
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value.replace("_", ""))
                except ValueError:
                    pass
        elif option is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif option is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(o.__name__ for o in options if o is not type(None))
    raise ConfigError(f"{key}={value!r} is not a valid {names}")


def override(config: Config, values: Mapping[str, Any]) -> Config:
    """Return ``config`` with ``values`` applied; unknown keys and wrong types raise ConfigError."""
    kinds = _field_types()
    changes = {}
    for key, value in values.items():
        if key not in kinds:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(kinds)}")
        changes[key] = _coerce(key, value, kinds[key])
    return dataclasses.replace(config, **changes)


def parse_positive_numbers(
    text: str, name: str, kind: type[float] | type[int] = float
) -> list[float]:
    """The comma-separated positive, finite numbers of ``text`` (a grid or a list of steps)."""
    try:
        values = [float(kind(item)) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v < math.inf for v in values):
        example = "0.01,0.1" if kind is float else "10,50"
        raise ConfigError(f"invalid value {name}={text!r}; give positive numbers like {example}")
    return values


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """Parse ``key=value`` strings from the command line."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        values[key.strip()] = value.strip()
    return values


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("metalstm") / "presets"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_preset(name: str) -> Config:
    """The :class:`Config` of a named preset (``metalstm/presets/NAME.yaml``)."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    text = (resources.files("metalstm") / "presets" / f"{name}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"preset {name!r} is not a mapping of config keys")
    return override(Config(), values)


def save_yaml(config: Config) -> str:
    """The config as YAML text (every field, so a run folder states all it used)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
