"""Nearest neighbour in pixel space (a floor for every other method): 1-NN under cosine distance.

Every query image takes the label of its nearest support image (:class:`.metric.NearestNeighbour`),
by cosine distance between the raw pixels: no parameters, nothing to train. The paper's
Baseline-nearest-neighbour, in a pre-trained embedding, sits with the other pre-trained baseline.
"""

from __future__ import annotations

from torch import Tensor

from ..registry import TrainsOn, register
from .base import NO_BATCHNORM, Classifier, Method
from .metric import NearestNeighbour


def _pixels(x: Tensor) -> Tensor:
    return x.flatten(1)


@register("nn-pixel", title="Baseline-nearest-neighbour (pixels)", trains_on=TrainsOn.NOTHING)
class NearestNeighbourPixels(Method):
    """1-NN in pixel space, cosine distance: no parameters, nothing to train."""

    def test_batchnorm(self) -> str:
        return NO_BATCHNORM

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        return NearestNeighbour(_pixels(support_x), support_y, self.config.n_way, _pixels)
