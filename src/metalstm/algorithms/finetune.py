"""Baseline-finetune (Ravi & Larochelle 2017, Sec. 5): fine-tune a pre-trained network per episode.

The network pre-trained on all meta-training classes (:mod:`.pretraining`) gets, on every episode,
a new N-way output layer (zeros); then plain SGD on the whole network fits the support set
(full-batch, cross-entropy). The learning rate and number of steps are chosen on validation
episodes, from the grids ``finetune_lr_grid`` x ``finetune_steps_grid``, at every validation of
the pre-training: the choice lives in the model's buffers, so the best checkpoint carries the
setting that made it best, and ``metalstm evaluate`` uses it.

Batch norm uses the pre-training running statistics throughout (eval mode), so the fine-tuned
classifier never sees statistics of the test episode beyond its support images' labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..algorithm import Classifier
from ..metalearner import AdaptedLearner
from .pretraining import PretrainedClassifier, parse_grid


class Finetune(PretrainedClassifier):
    """Baseline-finetune: pre-trained conv-4, new output layer, SGD on the support set.

    Example::

        model, _ = load_algorithm("runs/finetune/best")
        logits = model.predict(support_x, support_y, query_x)
    """

    name: ClassVar[str] = "finetune"

    def fine_tune(self, support_x: Tensor, support_y: Tensor, lr: float, steps: int) -> Tensor:
        """θ [n] of the N-way learner after ``steps`` SGD steps from (pre-trained body, 0 head)."""
        body = self.body()
        theta = torch.cat([body, body.new_zeros(self.learner.n_params - self.n_body)])
        bn = self.bn_state()  # eval mode: read, never updated
        for _ in range(steps):
            with torch.enable_grad():
                at = theta.detach().requires_grad_(True)
                logits = self.learner(at, support_x, bn, batch_stats=False)
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, support_y), at)
            theta = theta.detach() - lr * grad
        return theta

    def adaptation(self) -> str:
        lr, steps = float(self.finetune_lr), int(self.finetune_steps)
        return f"SGD lr {lr:g}, {steps} steps (chosen on validation)"

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        lr, steps = float(self.finetune_lr), int(self.finetune_steps)
        theta = self.fine_tune(support_x, support_y, lr, steps)
        bn = {k: v.clone() for k, v in self.bn_state().items()}
        return AdaptedLearner(self.learner, theta, bn, transductive=False)

    def validate(self, score: Callable[[], float]) -> float:
        """Try each (learning rate, steps) of the grids on validation episodes; keep the best."""
        best: tuple[float, float, int] | None = None
        for lr in parse_grid(self.config, "finetune_lr_grid", float):
            for steps in parse_grid(self.config, "finetune_steps_grid", int):
                self.finetune_lr.fill_(lr)
                self.finetune_steps.fill_(int(steps))
                accuracy = score()
                if best is None or accuracy > best[0]:
                    best = (accuracy, lr, int(steps))
        assert best is not None
        self.finetune_lr.fill_(best[1])
        self.finetune_steps.fill_(best[2])
        return best[0]
