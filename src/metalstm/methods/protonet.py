"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class's prototype is the mean of its support embeddings; a query's logits are the negative
squared Euclidean distances to the prototypes, trained with cross-entropy on the query set. The
embedding is the learner's conv-4 body (see :mod:`.metric` for the shared batch-norm protocol).
"""

from __future__ import annotations

from torch import Tensor

from ..config import Config
from ..inner_loop import class_means, episode_ways
from ..registry import register
from .metric import MetricMethod, metric_recipe

# Snell et al. (2017), section 3: training episodes have more ways than the test's (Omniglot: 60
# with 5 queries per class; miniImageNet: 30 for 1-shot and 20 for 5-shot, 15 queries), and the
# training shot matches the test's.
TRAIN_WAYS = {
    ("omniglot", 1): 60,
    ("omniglot", 5): 60,
    ("miniimagenet", 1): 30,
    ("miniimagenet", 5): 20,
}
TRAIN_QUERIES = {"omniglot": 5, "miniimagenet": 15}


def prototypes(support: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """[N, D]: class means of the support embeddings [S, D] (the prototypes c_k)."""
    return class_means(support, support_y, n_way)


def protonet_recipe(config: Config) -> dict[str, float | int]:
    """The metric methods' recipe with Snell et al.'s training episodes: more ways than at test,
    the test's shot, their queries per class; validation keeps the test's episodes."""
    ways = TRAIN_WAYS.get((config.dataset, config.k_shot), config.n_way)
    return {
        **metric_recipe(config),
        "train_n_way": max(ways, config.n_way),
        "train_k_shot": config.k_shot,
        "q_query": TRAIN_QUERIES.get(config.dataset, config.q_query),
        "eval_q_query": config.eval_queries,
    }


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """[A, B]: ||x_a - y_b||² for rows x [A, D], y [B, D]."""
    return (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)


@register(
    "protonet",
    title="Prototypical Networks",
    recipe=protonet_recipe,
    reference="Snell, Swersky & Zemel, NeurIPS 2017",
    # Snell et al. (2017), Tables 1 and 2.
    published={
        ("omniglot", 5, 1): 98.8,
        ("omniglot", 5, 5): 99.7,
        ("omniglot", 20, 1): 96.0,
        ("omniglot", 20, 5): 98.9,
        ("miniimagenet", 5, 1): 49.42,
        ("miniimagenet", 5, 5): 68.20,
    },
)
class ProtoNet(MetricMethod):
    """Prototypical Networks: logits = −||f(x) − c_k||², c_k the mean support embedding of class k.

    Example::

        model = ProtoNet(override(load_preset("omniglot-5w1s"), {"method": "protonet"}))
        loss = model.meta_loss(episode).loss        # meta-training
        labels = model.predict(sx, sy, qx).argmax(-1)
    """

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        return -squared_distances(query, prototypes(support, support_y, episode_ways(support_y)))
