"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class's prototype is the mean of its support embeddings; a query's logits are the negative
squared Euclidean distances to the prototypes, trained with cross-entropy on the query set. The
embedding is the learner's conv-4 body (see :mod:`.metric` for the shared batch-norm protocol).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .metric import MetricAlgorithm, class_means


def prototypes(support: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """[N, D]: class means of the support embeddings [S, D] (the prototypes c_k)."""
    return class_means(support, support_y, n_way)


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """[A, B]: ||x_a - y_b||² for rows x [A, D], y [B, D]."""
    return (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)


class ProtoNet(MetricAlgorithm):
    """Prototypical Networks: logits = −||f(x) − c_k||², c_k the mean support embedding of class k.

    Example::

        model = ProtoNet(override(load_preset("omniglot-5w1s"), {"algorithm": "protonet"}))
        loss = model.meta_loss(episode).loss        # meta-training
        labels = model.predict(sx, sy, qx).argmax(-1)
    """

    name: ClassVar[str] = "protonet"

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        return -squared_distances(query, prototypes(support, support_y, self.config.n_way))
