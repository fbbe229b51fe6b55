"""MAML (Finn, Abbeel & Levine, ICML 2017), second-order and first-order, on the learner's flat θ.

Inner loop (one episode), from the meta-learned initialisation θ_0 = θ:

    θ_t = θ_{t-1} − α ∇θ L_support(θ_{t-1}),   t = 1..T   (α = ``maml_inner_lr``, T = inner_steps)

Meta-loss: the query loss at θ_T. ``maml`` differentiates through the inner gradients (second
order, ``create_graph``); ``maml-fo`` treats them as constants (first-order MAML), so its
meta-gradient is the query gradient at θ_T. The meta-batch is a plain loop over episodes in the
shared Trainer (never ``vmap``: batch norm in training mode under ``vmap`` gave wrong second-order
gradients). Batch norm follows the meta-learner's protocol: fresh statistics per episode, support
steps with batch statistics, query with batch statistics while meta-training and with the support
passes' running statistics at evaluation (unless ``transductive``). Evaluation runs
``eval_inner_steps`` steps (default: ``inner_steps``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algorithm import Algorithm, Classifier, EpisodeLoss, accuracy
from ..config import Config
from ..data import Episode
from ..errors import ConfigError
from ..learner import BatchNormState
from ..metalearner import AdaptedLearner, learner_loss_and_grad


class MAML(Algorithm):
    """Second-order MAML: the meta-gradient flows through the inner loop's gradients.

    Example::

        model = MAML(override(load_preset("omniglot-5w1s"),
                              {"algorithm": "maml", "inner_steps": 1, "maml_inner_lr": 0.4}))
        model.meta_loss(episode).loss.backward()
    """

    name: ClassVar[str] = "maml"
    second_order: ClassVar[bool] = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if config.maml_inner_lr <= 0:
            raise ConfigError(f"invalid value maml_inner_lr={config.maml_inner_lr}; use > 0")
        self.theta = nn.Parameter(self.learner.initial_theta())  # θ_0, the meta-learned init

    def adaptation(self) -> str:
        cfg = self.config
        return f"α = {cfg.maml_inner_lr:g}, {_steps(cfg.inner_steps)} ({cfg.test_steps} at test)"

    def inner_loop(
        self, support_x: Tensor, support_y: Tensor, steps: int
    ) -> tuple[Tensor, BatchNormState]:
        """θ_T and the support passes' BN statistics after ``steps`` SGD steps from θ_0.

        The graph back to θ_0 is built only when gradients are enabled (meta-training); the
        inner gradients keep their own graph only for second-order MAML.
        """
        bn = self.learner.fresh_batchnorm_state(support_x.device, support_x.dtype)
        second_order = self.second_order and torch.is_grad_enabled()
        theta: Tensor = self.theta
        for _ in range(steps):
            _, grad = learner_loss_and_grad(
                self.learner, theta, support_x, support_y, bn, second_order
            )
            theta = theta - self.config.maml_inner_lr * grad
        return theta, bn

    def meta_loss(self, episode: Episode) -> EpisodeLoss:
        theta, bn = self.inner_loop(episode.support_x, episode.support_y, self.config.inner_steps)
        logits = self.learner(
            theta, episode.query_x, bn, batch_stats=self.config.train_query_batch_stats
        )
        return EpisodeLoss(
            F.cross_entropy(logits, episode.query_y), accuracy(logits, episode.query_y)
        )

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        with torch.no_grad():
            theta, bn = self.inner_loop(support_x, support_y, self.config.test_steps)
        return AdaptedLearner(self.learner, theta, bn, self.config.transductive)


class FirstOrderMAML(MAML):
    """First-order MAML: inner gradients are constants; meta-gradient = query gradient at θ_T."""

    name: ClassVar[str] = "maml-fo"
    second_order: ClassVar[bool] = False


def sgd_from_init(config: Config, theta0: Tensor, lr: float) -> FirstOrderMAML:
    """The learner trained by plain SGD (step ``lr``) from ``theta0``: an ablation baseline.

    With the meta-learner's learned θ_0 = c_0 this isolates what the learned update rule adds to
    the learned initialisation (Ravi & Larochelle 2017, Eq. 2 with σ(f) = 1, σ(i) = ``lr``): the
    same learner, the same T = ``test_steps`` and the same batch-norm protocol. It is exactly MAML's
    adaptation with θ_0 = ``theta0`` and α = ``lr``.

    Example::

        lstm, _ = load_algorithm("omniglot-5w1s")
        sgd = sgd_from_init(lstm.config, lstm.cell.theta0.detach(), lr=0.3)
        print(evaluate(sgd).line())
    """
    values = {**config.to_dict(), "algorithm": FirstOrderMAML.name, "maml_inner_lr": lr}
    model = FirstOrderMAML(Config.from_dict(values))
    with torch.no_grad():
        model.theta.copy_(theta0)
    return model.to(theta0.device)


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"
