"""Registry of the few-shot methods; every one implements :class:`metalstm.algorithm.Algorithm`.

=================  ======================================================  ===================
name               method                                                  trained on
=================  ======================================================  ===================
``lstm``           meta-learner LSTM (Ravi & Larochelle 2017)              episodes
``finetune``       Baseline-finetune: pre-trained conv-4, SGD per episode  mini-batches
``nn-pixel``       Baseline-nearest-neighbour, pixels, cosine              nothing
``nn-embedding``   Baseline-nearest-neighbour, pre-trained embedding       mini-batches
``matching``       Matching Networks (Vinyals et al. 2016)                 episodes
``matching-fce``   Matching Networks with full context embeddings          episodes
``maml``           MAML, second order (Finn et al. 2017)                   episodes
``maml-fo``        MAML, first order                                       episodes
``protonet``       Prototypical Networks (Snell et al. 2017)               episodes
=================  ======================================================  ===================
"""

from __future__ import annotations

import torch

from ..algorithm import Algorithm
from ..config import Config
from ..errors import ConfigError
from ..metalearner import MetaLSTM
from .finetune import Finetune
from .maml import MAML, FirstOrderMAML
from .matching import MatchingNet, MatchingNetFCE
from .nearest import NearestNeighbourEmbedding, NearestNeighbourPixels
from .protonet import ProtoNet

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        MetaLSTM,
        Finetune,
        NearestNeighbourPixels,
        NearestNeighbourEmbedding,
        MatchingNet,
        MatchingNetFCE,
        MAML,
        FirstOrderMAML,
        ProtoNet,
    )
}


def algorithm_class(name: str) -> type[Algorithm]:
    """The method registered as ``name``."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ConfigError(f"unknown algorithm {name!r}; known: {known}") from None


def build_algorithm(config: Config) -> Algorithm:
    """A freshly initialised method named by ``config.algorithm``."""
    cls = algorithm_class(config.algorithm)
    # Module initialisers draw from torch's global generator: fork it so that building a model
    # is a pure function of the config's seed and leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(config)
