"""The two baselines of Ravi & Larochelle (2017, Sec. 5) on a pre-trained network: fine-tuning
and nearest neighbour in its embedding (one pre-training serves both, see :mod:`.pretraining`).

Baseline-nearest-neighbour: every query image takes the label of its nearest support image by
cosine distance in the pre-trained embedding (:class:`.metric.NearestNeighbour`).

Baseline-finetune: the pre-trained network gets, on every episode, a new N-way output layer (zeros);
then plain SGD on the whole network fits the support set (full-batch, cross-entropy). The learning
rate and number of steps are chosen on validation episodes, from the grids ``finetune_lr_grid`` x
``finetune_steps_grid``, at every validation of the pre-training: the choice lives in the model's
buffers, so the best checkpoint carries the setting that made it best, and ``metalstm evaluate``
uses it. One fine-tuning run per learning rate serves every step count of the grid (the shorter ones
are its prefixes).

Batch norm uses the pre-training running statistics throughout (eval mode), so the fine-tuned
classifier never sees statistics of the test episode beyond its support images' labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..inner_loop import SGD, AdaptedLearner, run_inner_loop
from ..registry import TrainsOn, register
from .base import Classifier, Score
from .metric import NearestNeighbour
from .pretraining import PretrainedClassifier, PretrainSettings, parse_grid, pretrained_recipe

# Both baselines start from one network pre-trained on all meta-training classes (Sec. 5).
RAVI_LAROCHELLE_BASELINES = "Ravi & Larochelle, ICLR 2017, Sec. 5"


@register(
    "finetune",
    title="Baseline-finetune",
    settings=PretrainSettings,
    trains_on=TrainsOn.BATCHES,
    recipe=pretrained_recipe,
    reference=RAVI_LAROCHELLE_BASELINES,
    # Ravi & Larochelle (2017), Table 1.
    published={("miniimagenet", 5, 1): 28.86, ("miniimagenet", 5, 5): 49.79},
)
class Finetune(PretrainedClassifier):
    """Baseline-finetune: pre-trained conv-4, new output layer, SGD on the support set.

    Example::

        model, _ = load_method("runs/finetune/best")
        logits = model.predict(support_x, support_y, query_x)
    """

    def fine_tune(self, support_x: Tensor, support_y: Tensor, lr: float, steps: int) -> Tensor:
        """θ [n] of the N-way learner after ``steps`` SGD steps from (pre-trained body, 0 head)."""
        return self.fine_tune_path(support_x, support_y, lr, [steps])[0]

    def fine_tune_path(
        self, support_x: Tensor, support_y: Tensor, lr: float, steps: Sequence[int]
    ) -> list[Tensor]:
        """θ [n] after each of ``steps`` SGD steps (any order), all from one run of max(steps)."""
        body = self.body()
        theta = torch.cat([body, body.new_zeros(self.learner.n_params - self.n_body)])
        with torch.no_grad():
            result = run_inner_loop(
                self.learner,
                SGD(lr),
                theta.detach(),
                support_x,
                support_y,
                max(steps),
                bn=self.bn_state(),  # eval mode: read, never updated
                batch_stats=False,
                keep_steps=tuple(steps),
            )
        return [result.thetas[count] for count in steps]

    def adaptation(self) -> str:
        lr, steps = float(self.finetune_lr), int(self.finetune_steps)
        return f"SGD lr {lr:g}, {steps} steps (chosen on validation)"

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        lr, steps = float(self.finetune_lr), int(self.finetune_steps)
        return self.classifier(self.fine_tune(support_x, support_y, lr, steps))

    def classifier(self, theta: Tensor) -> Classifier:
        """The N-way learner at θ with the pre-training statistics (copied)."""
        bn = {k: v.clone() for k, v in self.bn_state().items()}
        return AdaptedLearner(self.learner, theta, bn, transductive=False)

    def validate(self, score: Score) -> float:
        """Score every (learning rate, steps) of the grids on the validation episodes in one pass
        (one fine-tuning run per learning rate); keep the best, the first in grid order on ties."""
        lrs = parse_grid(self.settings, "finetune_lr_grid", float)
        step_counts = [int(s) for s in parse_grid(self.settings, "finetune_steps_grid", int)]
        grid = [(lr, steps) for lr in lrs for steps in step_counts]

        def adapt_all(support_x: Tensor, support_y: Tensor) -> list[Classifier]:
            return [
                self.classifier(theta)
                for lr in lrs
                for theta in self.fine_tune_path(support_x, support_y, lr, step_counts)
            ]

        accuracies = score(adapt_all)
        best = max(range(len(grid)), key=lambda k: (accuracies[k], -k))
        self.finetune_lr.fill_(grid[best][0])
        self.finetune_steps.fill_(grid[best][1])
        return accuracies[best]


@register(
    "nn-embedding",
    title="Baseline-nearest-neighbour (embedding)",
    settings=PretrainSettings,
    trains_on=TrainsOn.BATCHES,
    uses_training_of=Finetune.name,  # the same pre-trained network (same state)
    reference=RAVI_LAROCHELLE_BASELINES,
    # Ravi & Larochelle (2017), Table 1.
    published={("miniimagenet", 5, 1): 41.08, ("miniimagenet", 5, 5): 51.04},
)
class NearestNeighbourEmbedding(PretrainedClassifier):
    """1-NN, cosine distance, in the embedding of the network pre-trained on training classes."""

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        with torch.no_grad():
            support = self.embed(support_x)
        return NearestNeighbour(support, support_y, self.config.n_way, self.embed)
