"""Meta-learners and their optimizers to and from checkpoint tensors (see :mod:`.checkpoint`).

Model tensors are stored as ``model.<state_dict key>`` and Adam's state as
``optim.<param index>.<key>``; the rest of a checkpoint (config, training state) is JSON metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .algorithm import Algorithm
from .algorithms import build_algorithm
from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import Config
from .errors import CheckpointError, ConfigError


def algorithm_tensors(algorithm: Algorithm) -> dict[str, Tensor]:
    return {f"model.{k}": v.detach() for k, v in algorithm.state_dict().items()}


def algorithm_from_tensors(algorithm: Algorithm, tensors: dict[str, Tensor], path: Path) -> None:
    """Load ``model.*`` tensors into ``algorithm``, refusing any difference of names or shapes."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = algorithm.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(
            f"checkpoint {path} holds other tensors than a {algorithm.name!r} model "
            f"(missing {sorted(set(expected) - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - set(expected))[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint {path} has {key} of shape {tuple(value.shape)} but this learner "
                f"needs {tuple(expected[key].shape)}; it was trained for another learner shape"
            )
    algorithm.load_state_dict(state)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for index, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            out[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return out


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, Tensor],
    param_groups: list[dict[str, Any]],
    path: Path,
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError) as error:
        raise CheckpointError(
            f"checkpoint {path} has an incompatible optimizer state: {error}"
        ) from None


def load_algorithm(
    name_or_path: str | Path, device: str | torch.device = "cpu", **overrides: Any
) -> tuple[Algorithm, dict[str, Any]]:
    """A trained method from a checkpoint path, run folder or shipped name, with its metadata.

    ``overrides`` change evaluation-time settings (e.g. ``eval_inner_steps``, ``transductive``).
    """
    path = resolve_checkpoint(str(name_or_path))
    tensors, meta = load_checkpoint(path, device=device)
    if "config" not in meta or "algorithm" not in meta:
        raise CheckpointError(f"{path} is not a metalstm model checkpoint (no config in it)")
    try:
        config = Config.from_dict({**meta["config"], **overrides, "device": str(device)})
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {error}") from None
    algorithm = build_algorithm(config).to(device)
    algorithm_from_tensors(algorithm, tensors, path)
    algorithm.eval()
    return algorithm, {**meta, "path": str(path)}
