"""Baseline-nearest-neighbour (Ravi & Larochelle 2017, Sec. 5): 1-NN under cosine distance.

Every query image takes the label of its nearest support image, by cosine distance, either in
pixel space (``nn-pixel``: nothing to train) or in the embedding of the network pre-trained on all
meta-training classes (``nn-embedding``, the paper's baseline; same pre-training as
``finetune``). The classifier's logits are, per class, the highest cosine similarity of the query
to that class's support images, so their arg-max is the nearest neighbour's label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import TrainsOn, register
from .base import NO_BATCHNORM, Classifier, Method
from .pretraining import PretrainedClassifier, PretrainSettings


def nearest_neighbour_logits(
    support: Tensor, support_y: Tensor, query: Tensor, n_way: int
) -> Tensor:
    """[Q, N]: for each query row, its highest cosine similarity to a support row of each class.

    ``support`` [S, ...] and ``query`` [Q, ...] are flattened to vectors; ``support_y`` [S] holds
    labels in ``0..n_way-1``. The arg-max of a row is the 1-nearest-neighbour label.
    """
    sims = F.normalize(query.flatten(1), dim=1) @ F.normalize(support.flatten(1), dim=1).T
    out = sims.new_full((sims.shape[0], n_way), -2.0)  # below any cosine similarity
    index = support_y.unsqueeze(0).expand_as(sims)
    return out.scatter_reduce(1, index, sims, reduce="amax", include_self=True)


@dataclass
class NearestNeighbour:
    """Labels query images by their nearest support image in ``embed``'s space."""

    support: Tensor  # embedded support images [S, D]
    support_y: Tensor  # [S]
    n_way: int
    embed: Callable[[Tensor], Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        return nearest_neighbour_logits(self.support, self.support_y, self.embed(x), self.n_way)


def _pixels(x: Tensor) -> Tensor:
    return x.flatten(1)


@register("nn-pixel", title="Baseline-nearest-neighbour (pixels)", trains_on=TrainsOn.NOTHING)
class NearestNeighbourPixels(Method):
    """1-NN in pixel space, cosine distance: no parameters, nothing to train."""

    def test_batchnorm(self) -> str:
        return NO_BATCHNORM

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        return NearestNeighbour(_pixels(support_x), support_y, self.config.n_way, _pixels)


@register(
    "nn-embedding",
    title="Baseline-nearest-neighbour (embedding)",
    settings=PretrainSettings,
    trains_on=TrainsOn.BATCHES,
    uses_training_of="finetune",  # the same pre-trained network (same state)
    # Ravi & Larochelle (2017), Table 1.
    published={("miniimagenet", 5, 1): 41.08, ("miniimagenet", 5, 5): 51.04},
)
class NearestNeighbourEmbedding(PretrainedClassifier):
    """1-NN, cosine distance, in the embedding of the network pre-trained on training classes."""

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        with torch.no_grad():
            support = self.embed(support_x)
        return NearestNeighbour(support, support_y, self.config.n_way, self.embed)
