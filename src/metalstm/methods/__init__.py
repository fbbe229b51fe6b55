"""The few-shot methods; each module registers its own (:mod:`metalstm.registry`).

Importing this package registers the built-in methods, in the order of the ``compare`` table
(the paper's Table 1, then later methods); ``metalstm methods`` lists them with their titles
and settings. A new method is one module that calls :func:`metalstm.registry.register`, plus
its import here (or anywhere, for a plug-in).
"""

from __future__ import annotations

import importlib

import torch

from ..config import Config
from ..registry import method_entry
from .base import Method

#: The built-in method modules. Importing one registers its methods, so this order is the order
#: of the ``compare`` table: the paper's Table 1 (the pre-trained baselines, with the pixel floor
#: beside them, Matching Networks, the meta-learner), then later methods.
BUILTIN = ("finetune", "nearest", "matching", "metalearner", "maml", "protonet")
for _module in BUILTIN:
    importlib.import_module(f".{_module}", __name__)


def build_method(config: Config) -> Method:
    """A freshly initialised method named by ``config.method``."""
    cls = method_entry(config.method).cls
    # Module initialisers draw from torch's global generator: fork it so that building a model
    # is a pure function of the config's seed and leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(config)
