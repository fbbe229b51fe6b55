"""The few-shot methods; each module registers its own (:mod:`metalstm.registry`).

Importing this package registers the built-in methods, in the order of the ``compare`` table
(the paper's Table 1, then later methods): ``finetune``, ``nn-pixel``, ``nn-embedding``,
``matching``, ``matching-fce``, ``lstm``, ``maml``, ``maml-fo``, ``protonet``
(``metalstm methods`` lists them with their titles and settings).
"""

from __future__ import annotations

import torch

from ..config import Config
from ..registry import method_entry
from . import finetune, maml, matching, metalearner, nearest, protonet  # noqa: F401  (registers)
from .base import Method


def build_method(config: Config) -> Method:
    """A freshly initialised method named by ``config.method``."""
    cls = method_entry(config.method).cls
    # Module initialisers draw from torch's global generator: fork it so that building a model
    # is a pure function of the config's seed and leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(config)
