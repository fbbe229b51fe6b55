"""Typed configuration of a run: shared sections, the method and its own settings; presets as YAML.

A :class:`Config` says everything about a run. Its shared sections (:data:`SECTIONS`: data,
episodes, learner, training, evaluation, execution) are flat fields; ``method`` names a
registered method (:mod:`metalstm.registry`) and ``settings`` holds that method's own frozen
settings dataclass, which the method's module defines and validates. It is frozen;
:func:`override` returns a new one, from flat ``key=value`` pairs (a key names a shared field or
a setting of the run's method), dotted keys (``training.lr``, ``settings.inner_steps``) or a
nested ``settings`` mapping. Presets live in ``metalstm/presets/NAME.yaml`` and list only the
keys that differ from the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

import yaml

from .errors import ConfigError
from .registry import MethodSettings, check_values, method_entry, methods_with_setting


@dataclass(frozen=True)
class Config:
    """Settings of a run; defaults follow Ravi & Larochelle (2017) where the paper fixes them."""

    # -- data ------------------------------------------------------------------------------------
    dataset: str = (
        "omniglot"  # a registered dataset (data.sources): omniglot | miniimagenet | folder
    )
    split: str = "vinyals"  # omniglot: vinyals | lake; miniimagenet: ravi; folder: unused
    data_root: str | None = None  # default: $METALSTM_DATA, then the per-user cache folder
    image_size: int = 28
    channels: int = 1
    # -- episodes (N-way K-shot, Q queries per class) ---------------------------------------------
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15  # queries per class of meta-training episodes
    train_n_way: int | None = None  # ways of meta-training episodes; None = n_way
    train_k_shot: int | None = None  # shots of meta-training episodes; None = k_shot
    eval_q_query: int | None = None  # of validation and test episodes; None = q_query
    # -- learner: 4 x [conv3x3(filters), BN, ReLU, maxpool2] + linear ----------------------------
    filters: int = 32
    downsample: str = "pool"  # pool | stride: stride-2 convs, features averaged (Finn et al.)
    bn_momentum: float = 0.9  # weight of the new batch in the running statistics
    bn_eps: float = 1e-5
    # -- method: its name and its own settings (metalstm.registry; defaults: the meta-learner) -----
    method: str = "lstm"  # any registered method (metalstm methods / metalstm.registry)
    settings: MethodSettings = field(default_factory=lambda: method_entry("lstm").settings())
    # -- meta-training -----------------------------------------------------------------------------
    episodes: int = 50_000  # meta-training episodes (updates = episodes / meta_batch)
    meta_batch: int = 1  # episodes per meta-update (the paper: 1)
    lr: float = 1e-3  # Adam
    lr_schedule: str = "constant"  # constant | cosine
    lr_warmup: int = 0  # updates of linear warm-up from 0 to lr before the schedule
    clip_grad_norm: float = 0.25  # global norm of the meta-gradient
    val_interval: int = 1000  # episodes between validations
    val_episodes: int = 100
    val_seed: int = 1
    early_stopping: int = 0  # stop after this many validations without improvement (0 = never)
    max_nonfinite: int = 20  # stop after this many non-finite updates in a row
    log_interval: int = 50  # episodes between metric lines
    seed: int = 0
    # -- evaluation --------------------------------------------------------------------------------
    test_episodes: int = 600
    test_seed: int = 0
    transductive: bool = False  # query BN statistics from the query batch instead of the support
    # -- execution ---------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the meta-learner step (falls back to eager if it fails)
    # episodes run as one batched pass of the learner (methods that batch them: lstm, maml,
    # maml-fo): meta-training's items (each process's share of meta_batch, in groups of this
    # many) and evaluation's consecutive episodes; the same mathematics, other float rounding
    episode_batch: int = 1

    def __post_init__(self) -> None:
        checks = {
            "image_size": self.image_size >= 16,
            "channels": self.channels in (1, 3),
            "n_way": self.n_way >= 2,
            "k_shot": self.k_shot >= 1,
            "q_query": self.q_query >= 1,
            "eval_q_query": self.eval_q_query is None or self.eval_q_query >= 1,
            "train_n_way": self.train_n_way is None or self.train_n_way >= 2,
            "train_k_shot": self.train_k_shot is None or self.train_k_shot >= 1,
            "filters": self.filters >= 1,
            "downsample": self.downsample in ("pool", "stride"),  # learner.DOWNSAMPLING
            "episodes": self.episodes >= 1,
            "meta_batch": self.meta_batch >= 1,
            "episode_batch": self.episode_batch >= 1,
            "lr": self.lr > 0,
            "clip_grad_norm": self.clip_grad_norm > 0,
            "val_interval": self.val_interval >= 1,
            "val_episodes": self.val_episodes >= 1,
            "test_episodes": self.test_episodes >= 1,
            "bn_momentum": 0.0 < self.bn_momentum <= 1.0,
            "lr_schedule": self.lr_schedule in ("constant", "cosine"),
            "lr_warmup": self.lr_warmup >= 0,
            "max_nonfinite": self.max_nonfinite >= 1,
            "log_interval": self.log_interval >= 1,
        }
        check_values(self, checks, SIZE_LIMITS)
        expected = method_entry(self.method).settings
        if type(self.settings) is not expected:
            raise ConfigError(
                f"method {self.method!r} takes {expected.__name__}, "
                f"not {type(self.settings).__name__}"
            )
        size = learner_size(self)
        if size > MAX_LEARNER_SIZE:
            raise ConfigError(
                f"a learner of {size:,} parameters (filters={self.filters}, "
                f"image_size={self.image_size}, n_way={self.n_way}) is more than the "
                f"{MAX_LEARNER_SIZE:,} supported; lower filters, image_size or n_way"
            )

    @property
    def train_ways(self) -> int:
        """Ways of meta-training episodes (defaults to the test value)."""
        return self.train_n_way or self.n_way

    @property
    def train_shots(self) -> int:
        """Support images per class of meta-training episodes (defaults to the test value)."""
        return self.train_k_shot or self.k_shot

    @property
    def eval_queries(self) -> int:
        """Queries per class of validation and test episodes (defaults to the training value)."""
        return self.eval_q_query or self.q_query

    def to_dict(self) -> dict[str, Any]:
        """Every shared key, ``method`` and its ``settings`` (a nested mapping)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Build from a mapping (this version's layout, or the flat keys of earlier versions,
        where every method's settings sat side by side: those of other methods are skipped)."""
        return override(cls(), values, strict=False)


#: The shared sections of the run config, for dotted keys (``--set training.lr=...``).
SECTIONS = {
    "data": ("dataset", "split", "data_root", "image_size", "channels"),
    "episodes": ("n_way", "k_shot", "q_query", "eval_q_query", "train_n_way", "train_k_shot"),
    "learner": ("filters", "downsample", "bn_momentum", "bn_eps"),
    "training": (
        "episodes",
        "meta_batch",
        "lr",
        "lr_schedule",
        "lr_warmup",
        "clip_grad_norm",
        "val_interval",
        "val_episodes",
        "val_seed",
        "early_stopping",
        "max_nonfinite",
        "log_interval",
        "seed",
    ),
    "evaluation": ("test_episodes", "test_seed", "transductive"),
    "execution": ("device", "compile", "episode_batch"),
}
METHOD_KEYS = ("algorithm", "method")  # "algorithm": the earlier name ("method" wins)
SIZE_LIMITS = {
    "image_size": 512,
    "filters": 512,
    "n_way": 1000,
    "k_shot": 1000,
    "q_query": 1000,
    "eval_q_query": 1000,
    "train_n_way": 1000,
    "train_k_shot": 1000,
    "meta_batch": 10_000,
    "episode_batch": 1_000,
    "val_episodes": 1_000_000,
    "test_episodes": 1_000_000,
}
MAX_LEARNER_SIZE = 5_000_000  # θ of the conv-4 learner; the Omniglot and miniImageNet ones: ~30 k


def learner_size(config: Config) -> int:
    """Parameters of the conv-4 learner (:class:`metalstm.learner.ConvNet`), by arithmetic."""
    side, c_in, total = config.image_size, config.channels, 0
    for _ in range(4):
        # conv weight and bias, BN scale and shift
        total += 9 * c_in * config.filters + 3 * config.filters
        side, c_in = side // 2, config.filters
    features = config.filters if config.downsample == "stride" else config.filters * side * side
    return total + (features + 1) * max(config.n_way, config.train_ways)


def shared_keys() -> set[str]:
    """The keys of the shared sections (every run config has them, whatever its method)."""
    return {key for keys in SECTIONS.values() for key in keys}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


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


def _switch_method(settings: MethodSettings, name: str) -> MethodSettings:
    """The settings of method ``name``, keeping the values of the fields both methods have (a
    fine-tuning checkpoint read as the nearest-neighbour baseline keeps its pre-training)."""
    target = method_entry(name).settings
    if type(settings) is target:
        return settings
    common = {f.name for f in fields(target)} & {f.name for f in fields(settings)}
    return target(**{key: getattr(settings, key) for key in common})


def _undotted(key: str, method: str) -> str:
    """``section.key``, ``settings.key`` or ``METHOD.key`` → ``key`` (checked)."""
    prefix, dot, name = key.rpartition(".")
    if not dot:
        return key
    if prefix in SECTIONS and name in SECTIONS[prefix]:
        return name
    if prefix in ("settings", method) and name not in shared_keys():
        return name
    sections = ", ".join((*SECTIONS, "settings", method))
    raise ConfigError(f"unknown config key {key!r}; a dotted key is SECTION.KEY, with: {sections}")


def override(config: Config, values: Mapping[str, Any], *, strict: bool = True) -> Config:
    """Return ``config`` with ``values`` applied (flat keys, dotted keys, or a nested
    ``settings`` mapping); unknown keys and wrong types raise ConfigError.

    The method (``method``, formerly ``algorithm``) is applied first, so the other keys are
    read against its settings. A key that belongs to another registered method raises with
    ``strict`` and is skipped without (old flat files list every method's settings).
    """
    values = dict(values)
    method = config.method
    for alias in METHOD_KEYS:
        if alias in values:
            method = _coerce(alias, values.pop(alias), str)
    settings = _switch_method(config.settings, method)
    nested = values.pop("settings", None) or {}
    if not isinstance(nested, Mapping):
        raise ConfigError(f"settings must be a mapping of {method}'s settings, not {nested!r}")
    shared = _field_types(Config)
    kinds = _field_types(type(settings))
    changes: dict[str, Any] = {}
    setting_changes: dict[str, Any] = {}
    # The nested settings first: a flat key beside them (an override) wins.
    for raw, value in [*((f"settings.{k}", v) for k, v in nested.items()), *values.items()]:
        key = _undotted(str(raw), method)
        name = settings.field_for(key)
        if key in shared and key not in ("method", "settings"):
            changes[key] = _coerce(key, value, shared[key])
        elif name is not None:
            setting_changes[name] = _coerce(key, value, kinds[name])
        elif owners := methods_with_setting(key):
            if strict:
                raise ConfigError(
                    f"{key} is a setting of {', '.join(owners)}, not of this run's method "
                    f"{method!r}; set method first (--set method=NAME) or drop {key}"
                )
        else:
            known = sorted(shared_keys() | set(kinds))
            raise ConfigError(f"unknown config key {raw!r}; known keys: {', '.join(known)}")
    settings = dataclasses.replace(settings, **setting_changes)
    return dataclasses.replace(config, method=method, settings=settings, **changes)


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


def with_recipe(config: Config, method: str) -> Config:
    """``config`` (a preset: the meta-learner's recipe) turned to ``method`` with its registered
    recipe: the preset's data, test episodes and training schedule, the method's own default
    settings, and meta-training episodes of the test's shape (N ways, K shots, the test's
    queries) unless the recipe says otherwise. What ``compare`` and ``train --method`` train."""
    config = _turned_to(config, method)
    return override(config, method_entry(method).recipe(config))


def recipe_values(config: Config, method: str) -> dict[str, Any]:
    """What ``method``'s registered recipe sets on ``config`` (a preset), as ``key: value``: the
    settings of its own paper that :func:`with_recipe` puts on top of the preset."""
    return method_entry(method).recipe(_turned_to(config, method))


def _turned_to(config: Config, method: str) -> Config:
    """``config`` with ``method``'s default settings and episodes of the test's shape (unchanged
    where ``method`` is already the config's)."""
    if method == config.method:
        return config
    return dataclasses.replace(
        config,
        method=method,
        settings=method_entry(method).settings(),
        train_n_way=None,
        train_k_shot=None,
        q_query=config.eval_queries,
        eval_q_query=None,
    )


def save_yaml(config: Config) -> str:
    """The config as YAML text (every field, so a run folder states all it used)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
