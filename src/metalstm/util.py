"""Small helpers that several layers share and that belong to none of them: the compute device a
name asks for (:func:`resolve_device`) and the images of a config's split part
(:func:`load_part`)."""

from __future__ import annotations

import torch

from .config import Config
from .data import ClassImages, load_split
from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
    return device


def load_part(config: Config, part: str) -> ClassImages:
    """The images of ``part`` (train, val or test) of the config's dataset and split."""
    return load_split(
        config.dataset,
        config.split,
        part,
        data_root=config.data_root,
        image_size=config.image_size,
        channels=config.channels,
    )
