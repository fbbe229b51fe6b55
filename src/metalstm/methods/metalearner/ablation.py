"""Ablation of the meta-learner: its learned initialisation trained by plain SGD instead.

Ravi & Larochelle's meta-learner learns two things, the initialisation θ_0 = c_0 and the update
rule (Eq. 2). Evaluating plain SGD from the same θ_0, with the same T, learner and batch-norm
protocol, on the same fixed episodes, shows what the update rule adds. The SGD step is chosen on
the validation episodes (as any baseline's settings are), or given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import torch
from torch import Tensor

from ...config import Config
from ...errors import MetaLSTMError
from ...evaluation import evaluate
from ...inner_loop import (
    SGD,
    AdaptedLearner,
    InnerLoopSettings,
    episode_theta0,
    query_statistics,
    run_inner_loop,
)
from ...learner import BatchNormState
from ...progress import surrounding
from ..base import Classifier, Method, episode_batchnorm
from .method import MetaLSTM


class SGDFromInit(Method):
    """The learner trained by plain SGD (step ``lr``) from ``theta0``: an ablation baseline.

    With the meta-learner's learned θ_0 = c_0 this isolates what the learned update rule adds to
    the learned initialisation (Ravi & Larochelle 2017, Eq. 2 with σ(f) = 1, σ(i) = ``lr``): the
    same learner, the same T = ``eval_steps``, the same batch-norm protocol and the same inner
    loop (:func:`metalstm.inner_loop.run_inner_loop` with :class:`~metalstm.inner_loop.SGD`).
    Evaluated like any method; it is not registered (it has nothing to train or save).

    Example::

        lstm, _ = load_method("omniglot-5w1s")
        sgd = sgd_from_init(lstm.config, lstm.cell.theta0.detach(), lr=0.3)
        print(evaluate(sgd).line())
    """

    name = "sgd-from-init"
    settings: InnerLoopSettings

    def __init__(
        self,
        config: Config,
        theta0: Tensor,
        lr: float,
        query_stats: BatchNormState | None = None,
    ) -> None:
        super().__init__(config)
        if not isinstance(self.settings, InnerLoopSettings):
            raise MetaLSTMError(
                f"SGD from an initialisation needs inner-loop settings, not {config.method}"
            )
        if (self.settings.query_bn == "meta") != (query_stats is not None):
            raise MetaLSTMError(
                "query_bn=meta normalises the queries with the meta-learner's accumulated "
                "statistics: pass them as query_stats (and only then)"
            )
        self.theta0: Tensor
        self.register_buffer("theta0", theta0.detach().clone())
        self.lr = lr
        self.query_stats = query_stats

    def adaptation(self) -> str:
        return f"SGD lr {self.lr:g}, T = {self.settings.eval_steps}"

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        with torch.no_grad():
            result = run_inner_loop(
                self.learner,
                SGD(self.lr),
                episode_theta0(
                    self.learner, self.theta0, support_x, support_y, self.settings.head_init
                ),
                support_x,
                support_y,
                self.settings.eval_steps,
            )
        query_bn, transductive = self.settings.query_bn, self.config.transductive
        bn = query_statistics(
            self.learner, result, support_x, query_bn, transductive, self.query_stats
        )
        return AdaptedLearner(self.learner, result.theta, bn, transductive)

    def test_batchnorm(self) -> str:
        return episode_batchnorm(self.config.transductive, self.settings.query_bn)


def sgd_from_init(
    config: Config, theta0: Tensor, lr: float, query_stats: BatchNormState | None = None
) -> SGDFromInit:
    """:class:`SGDFromInit` from ``theta0`` with step ``lr``, on ``theta0``'s device
    (``query_stats``: the meta-learner's accumulated statistics, with ``query_bn=meta``)."""
    return SGDFromInit(config, theta0, lr, query_stats).to(theta0.device)


@dataclass
class SGDAblation:
    """Plain SGD from a θ_0 (``start`` names it), with the step it uses."""

    model: Method
    lr: float
    validation: dict[float, float]  # validation accuracy per step tried (empty: step given)
    start: str  # what θ_0 is, for describe()

    def describe(self) -> str:
        if not self.validation:
            return f"plain SGD from {self.start}, lr {self.lr:g}"
        tried = ", ".join(f"{lr:g}: {100 * acc:.1f} %" for lr, acc in self.validation.items())
        return f"plain SGD from {self.start}, lr {self.lr:g} (validation: {tried})"


def sgd_from_learned_init(
    model: Method,
    lrs: Sequence[float],
    *,
    val_episodes: int | None = None,
    progress: TextIO | None = None,
) -> SGDAblation:
    """Plain SGD from ``model``'s learned θ_0; with several ``lrs``, the best on validation
    (each step's validation shows its progress line on ``progress``).

    Example::

        lstm, _ = load_method("omniglot-5w1s")
        sgd = sgd_from_learned_init(lstm, [0.1, 0.3, 1.0])
        print(sgd.describe(), evaluate(sgd.model).line())
    """
    if not isinstance(model, MetaLSTM):
        raise MetaLSTMError(
            f"the SGD ablation needs a meta-learner LSTM checkpoint, not a {model.name!r} one"
        )
    stats = model.meta_batchnorm() if model.settings.query_bn == "meta" else None
    return sgd_on_validation(
        model.config,
        model.cell.theta0.detach(),
        lrs,
        val_episodes=val_episodes,
        progress=progress,
        query_stats=stats,
        start="the learned θ_0",
    )


def sgd_on_validation(
    config: Config,
    theta0: Tensor,
    lrs: Sequence[float],
    *,
    val_episodes: int | None = None,
    progress: TextIO | None = None,
    query_stats: BatchNormState | None = None,
    start: str,
) -> SGDAblation:
    """Plain SGD from ``theta0`` (:func:`sgd_from_init`) with the step among ``lrs`` that scores
    best on ``val_episodes`` validation episodes (``config.val_episodes`` by default; one step:
    that one, nothing validated); ``start`` names ``theta0`` in :meth:`SGDAblation.describe`."""
    if not lrs or any(not 0 < lr < math.inf for lr in lrs):
        raise MetaLSTMError(f"SGD steps must be positive numbers, got {list(lrs)}")
    candidates = {lr: sgd_from_init(config, theta0, lr, query_stats) for lr in lrs}
    if len(candidates) == 1:
        ((lr, sgd),) = candidates.items()
        return SGDAblation(sgd, lr, {}, start)
    episodes = val_episodes or config.val_episodes
    scores = {}
    for lr, sgd in candidates.items():
        with surrounding(f"SGD lr {lr:g} | "):
            result = evaluate(
                sgd, part="val", episodes=episodes, seed=config.val_seed, progress=progress
            )
        scores[lr] = result.mean
    best = max(scores, key=scores.__getitem__)
    return SGDAblation(candidates[best], best, scores, start)
