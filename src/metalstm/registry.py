"""The registry of few-shot methods: each method module registers itself, nothing else names it.

A method is registered with :func:`register` next to its class: its name, its title in reports,
its own frozen settings dataclass (a :class:`MethodSettings`), what the shared Trainer trains it
on (:class:`TrainsOn`), its recipe for ``metalstm compare`` (settings of its paper applied on top
of a preset) and its published figures. The Trainer, ``compare``, the CLI and ``predict`` only
go through :func:`method_entry` and :func:`method_names`.

Example (a plug-in method, from any module)::

    from dataclasses import dataclass
    from metalstm.registry import MethodSettings, TrainsOn, register
    from metalstm.methods.base import Method

    @dataclass(frozen=True)
    class ChanceSettings(MethodSettings):
        temperature: float = 1.0

    @register("chance", title="Chance", settings=ChanceSettings, trains_on=TrainsOn.NOTHING)
    class Chance(Method):
        ...

Then ``metalstm train/evaluate/compare`` accept ``--set method=chance --set temperature=2``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config
    from .methods.base import Method


class TrainsOn(Enum):
    """What the shared Trainer trains a method on."""

    EPISODES = "episodes"  # Method.meta_loss on N-way K-shot episodes
    BATCHES = "batches"  # Method.batch_loss on mini-batches over every training class
    NOTHING = "nothing"  # no parameters to train


def check_values(owner: object, checks: Mapping[str, bool], limits: Mapping[str, int]) -> None:
    """Raise :class:`ConfigError` for the first failed check, a value above its limit, or a
    float that is not finite: the one validation of the run config and of every method's
    settings."""
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"invalid value {key}={getattr(owner, key)!r}")
    for key, limit in limits.items():
        value = getattr(owner, key)
        if value is not None and value > limit:
            raise ConfigError(f"invalid value {key}={value!r}; at most {limit} is supported")
    for item in dataclasses.fields(owner):  # type: ignore[arg-type]
        value = getattr(owner, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"invalid value {item.name}={value!r}; give a finite number")


@dataclass(frozen=True)
class MethodSettings:
    """Base of a method's own settings: frozen, validated once, in :meth:`checks`.

    ``aliases`` maps the flat keys of earlier versions (e.g. ``maml_inner_lr``) to field names,
    so old ``config.yaml`` files, checkpoints and ``--set`` keys keep working; ``limits`` caps
    sizes, as :data:`metalstm.config.SIZE_LIMITS` does for the shared settings.
    """

    aliases: ClassVar[Mapping[str, str]] = {}
    limits: ClassVar[Mapping[str, int]] = {}

    def __post_init__(self) -> None:
        check_values(self, self.checks(), self.limits)

    def checks(self) -> dict[str, bool]:
        """``{field: value is valid}`` for every field with a constraint."""
        return {}

    @classmethod
    def field_for(cls, key: str) -> str | None:
        """The field that flat key ``key`` names (itself or an alias), or None."""
        name = cls.aliases.get(key, key)
        return name if name in {f.name for f in dataclasses.fields(cls)} else None


@dataclass(frozen=True)
class BatchSettings(MethodSettings):
    """Settings every method trained on mini-batches (``TrainsOn.BATCHES``) has."""

    pretrain_epochs: float = 10.0  # passes over the training images
    pretrain_batch: int = 64  # images per mini-batch
    limits: ClassVar[Mapping[str, int]] = {"pretrain_batch": 100_000}

    def checks(self) -> dict[str, bool]:
        return {
            "pretrain_epochs": self.pretrain_epochs > 0,
            "pretrain_batch": self.pretrain_batch >= 1,
        }


Recipe = Callable[["Config"], dict[str, Any]]
"""``recipe(preset_config)``: the method's own training settings on top of a preset (its paper's
where they differ), as ``key: value`` overrides."""

Published = Mapping[tuple[str, int, int], float]
"""(dataset, N, K) -> published accuracy (%), with the source cited where it is registered."""


def _no_recipe(config: Config) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MethodEntry:
    """Everything the rest of the package knows about one method."""

    name: str
    cls: type[Method]
    title: str
    settings: type[MethodSettings]
    trains_on: TrainsOn
    recipe: Recipe = _no_recipe
    published: Published = field(default_factory=dict)
    # The paper the method, its recipe and its published figures come from ("" for none).
    reference: str = ""
    # Another method whose trained checkpoint this one is built from (its training is shared).
    uses_training_of: str | None = None

    def published_on(self, config: Config) -> float | None:
        """The figure the method's paper published for ``config``'s dataset, N and K, if any."""
        return self.published.get((config.dataset, config.n_way, config.k_shot))


_METHODS: dict[str, MethodEntry] = {}
M = TypeVar("M", bound="type[Method]")


def register(
    name: str,
    *,
    title: str,
    settings: type[MethodSettings] = MethodSettings,
    trains_on: TrainsOn = TrainsOn.EPISODES,
    recipe: Recipe = _no_recipe,
    published: Published | None = None,
    reference: str = "",
    uses_training_of: str | None = None,
) -> Callable[[M], M]:
    """Class decorator: register a :class:`~metalstm.methods.base.Method` subclass as ``name``.

    Methods appear in ``compare`` tables in registration order. A settings field may not share
    a name with a shared config field (so every flat ``--set key=value`` names one thing).
    """

    def decorate(cls: M) -> M:
        from .config import shared_keys

        clash = {f.name for f in dataclasses.fields(settings)} & shared_keys()
        if clash:
            raise ConfigError(f"settings of {name!r} reuse shared config keys: {sorted(clash)}")
        if trains_on is TrainsOn.BATCHES and not issubclass(settings, BatchSettings):
            raise ConfigError(f"{name!r} trains on mini-batches: its settings need BatchSettings")
        cls.name = name
        _METHODS[name] = MethodEntry(
            name,
            cls,
            title,
            settings,
            trains_on,
            recipe,
            published or {},
            reference,
            uses_training_of,
        )
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove a registered method (for plug-ins and tests that register temporary ones)."""
    _METHODS.pop(name, None)


def _load_builtin() -> None:
    importlib.import_module("metalstm.methods")


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration (table) order."""
    _load_builtin()
    return tuple(_METHODS)


def method_entry(name: str) -> MethodEntry:
    """The registered method ``name``; a clear :class:`ConfigError` for an unknown one."""
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(_METHODS)
        raise ConfigError(f"unknown method {name!r}; known: {known}") from None


def methods_with_setting(key: str) -> list[str]:
    """Names of the registered methods whose settings have field (or alias) ``key``."""
    _load_builtin()
    return [n for n, e in _METHODS.items() if e.settings.field_for(key) is not None]
