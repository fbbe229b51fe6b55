"""Metric-based methods (Matching and Prototypical Networks): classify by distances in an embedding.

The embedding is the learner's conv-4 body (:meth:`metalstm.learner.Learner.features`) at a
meta-learned θ: the same architecture and filters as every other method. θ is the learner's whole
flat vector so all methods share one layout; the linear head's coordinates are unused here.

Batch norm follows the comparison's shared protocol (the meta-learner's, SPEC §1): statistics are
episode state, fresh for every episode. The support pass uses batch statistics and records them;
the query pass uses the query batch's statistics during meta-training and, at evaluation, the
support's recorded statistics (or the query batch's own when ``transductive``). With
``bn_momentum = 1`` the recorded statistics are exactly the support batch's.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..data import Episode, Episodes
from ..learner import BatchNormState, feature_dim
from .base import Classifier, EpisodeLoss, Method, accuracy


def metric_recipe(config: Config) -> dict[str, float | int]:
    """Recipe of the metric methods in ``compare``: BN momentum 1 (the support statistics used at
    test are exactly the support batch's), gradient clipping at norm 10, one episode per update."""
    return {"bn_momentum": 1.0, "clip_grad_norm": 10.0, "meta_batch": 1}


class MetricMethod(Method):
    """Shared by the metric methods: embed support and query, then :meth:`logits` from distances."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.theta = nn.Parameter(self.learner.initial_theta())
        self.embedding_dim = feature_dim(self.learner.shape)

    def any_ways(self) -> bool:
        return True  # logits from distances to the episode's classes, no output layer

    def embed(self, x: Tensor, bn: BatchNormState, batch_stats: bool) -> Tensor:
        """Embedding [B, D] of images x [B, C, H, W] at the meta-learned θ."""
        return self.learner.features(self.theta, x, bn, batch_stats=batch_stats)

    @abstractmethod
    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        """Logits [Q, N] of query embeddings [Q, D] given support embeddings [S, D], labels [S]
        in ``0..N-1`` (N: :func:`~metalstm.inner_loop.episode_ways`, any number of ways)."""

    def meta_loss(self, episode: Episode | Episodes) -> EpisodeLoss:
        bn = self.learner.fresh_batchnorm_state(episode.support_x.device, episode.support_x.dtype)
        support = self.embed(episode.support_x, bn, batch_stats=True)
        query = self.embed(episode.query_x, bn, batch_stats=True)
        logits = self.logits(support, episode.support_y, query)
        return EpisodeLoss(
            F.cross_entropy(logits, episode.query_y), accuracy(logits, episode.query_y)
        )

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        bn = self.learner.fresh_batchnorm_state(support_x.device, support_x.dtype)
        with torch.no_grad():
            support = self.embed(support_x, bn, batch_stats=True)
        return MetricClassifier(self, support, support_y, bn)


@dataclass
class MetricClassifier:
    """A metric method adapted to one support set (its embeddings and BN statistics)."""

    method: MetricMethod
    support: Tensor
    support_y: Tensor
    bn: BatchNormState

    def __call__(self, x: Tensor) -> Tensor:
        bn = {k: v.clone() for k, v in self.bn.items()}
        with torch.no_grad():
            query = self.method.embed(x, bn, batch_stats=self.method.config.transductive)
            return self.method.logits(self.support, self.support_y, query)


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
