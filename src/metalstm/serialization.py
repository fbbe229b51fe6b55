"""Meta-learners and their optimizers to and from checkpoint tensors (see :mod:`.checkpoint`).

Model tensors are stored as ``model.<state_dict key>`` and Adam's state as
``optim.<param index>.<key>``; the rest of a checkpoint (config, training state) is JSON metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import load_checkpoint, read_checkpoint_meta, resolve_checkpoint
from .config import Config
from .errors import CheckpointError, ConfigError
from .methods import build_method
from .methods.base import Method


def method_tensors(method: Method) -> dict[str, Tensor]:
    return {f"model.{k}": v.detach() for k, v in method.state_dict().items()}


def method_from_tensors(method: Method, tensors: dict[str, Tensor], path: Path) -> None:
    """Load ``model.*`` tensors into ``method``, refusing any difference of names or shapes
    and non-finite values."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = method.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(
            f"checkpoint {path} holds other tensors than a {method.name!r} model "
            f"(missing {sorted(set(expected) - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - set(expected))[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint {path} has {key} of shape {tuple(value.shape)} but this learner "
                f"needs {tuple(expected[key].shape)}; it was trained for another learner shape"
            )
    check_finite(state, path)
    method.load_state_dict(state)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for index, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            out[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return out


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, Tensor],
    param_groups: Any,
    path: Path,
) -> None:
    """Load ``optim.*`` tensors and the meta's ``param_groups``, refusing malformed ones."""
    state: dict[int, dict[str, Tensor]] = {}
    try:
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        if not isinstance(param_groups, list) or not all(isinstance(g, dict) for g in param_groups):
            raise ValueError("param_groups is not a list of mappings")
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise CheckpointError(
            f"checkpoint {path} has an incompatible optimizer state: {error}"
        ) from None


def load_method(
    name_or_path: str | Path, device: str | torch.device = "cpu", **overrides: Any
) -> tuple[Method, dict[str, Any]]:
    """A trained method from a checkpoint path, run folder or shipped name, with its metadata.

    ``overrides`` change evaluation-time settings (e.g. ``eval_inner_steps``, ``transductive``).
    """
    path = resolve_checkpoint(str(name_or_path))
    config = checkpoint_config(read_checkpoint_meta(path), path, overrides, device)
    tensors, meta = load_checkpoint(path, device=device)
    method = build_method(config).to(device)
    method_from_tensors(method, tensors, path)
    method.eval()
    return method, {**meta, "path": str(path)}


def method_meta(method: Method, kind: str, **extra: Any) -> dict[str, Any]:
    """The metadata saved with every checkpoint of ``method``: ``kind`` (training, untrained,
    shared), the method's name (under ``algorithm``, the key every version reads), its config and
    the learner's shape, then ``extra``."""
    return {
        "kind": kind,
        "algorithm": method.name,
        "config": method.config.to_dict(),
        "learner_shape": method.learner.shape.as_dict(),
        **extra,
    }


def checkpoint_config(
    meta: dict[str, Any], path: Path, overrides: dict[str, Any], device: str | torch.device
) -> Config:
    """The checked config of a checkpoint's meta (read from the header, before any tensor):
    its sizes are bounded (:class:`Config`), so building its model cannot run away."""
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("algorithm"), str):
        raise CheckpointError(f"{path} is not a metalstm model checkpoint (no config in it)")
    try:
        return Config.from_dict({**meta["config"], **overrides, "device": str(device)})
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {error}") from None


def check_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """Refuse weights with NaN or infinity: they come from a diverged run and score chance."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"checkpoint {path} has non-finite values (NaN or infinity) in {name}: it was "
                "saved from a diverged run; use an earlier checkpoint"
            )
