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

from .algorithm import Algorithm
from .algorithms.maml import sgd_from_init
from .errors import MetaLSTMError
from .evaluation import evaluate
from .metalearner import MetaLSTM
from .progress import surrounding


@dataclass
class SGDAblation:
    """Plain SGD from a meta-learner's learned θ_0, with the step it uses."""

    model: Algorithm
    lr: float
    validation: dict[float, float]  # validation accuracy per step tried (empty: step given)

    def describe(self) -> str:
        if not self.validation:
            return f"plain SGD from the learned θ_0, lr {self.lr:g}"
        tried = ", ".join(f"{lr:g}: {100 * acc:.1f} %" for lr, acc in self.validation.items())
        return f"plain SGD from the learned θ_0, lr {self.lr:g} (validation: {tried})"


def sgd_from_learned_init(
    model: Algorithm,
    lrs: Sequence[float],
    *,
    val_episodes: int | None = None,
    progress: TextIO | None = None,
) -> SGDAblation:
    """Plain SGD from ``model``'s learned θ_0; with several ``lrs``, the best on validation
    (each step's validation shows its progress line on ``progress``).

    Example::

        lstm, _ = load_algorithm("omniglot-5w1s")
        sgd = sgd_from_learned_init(lstm, [0.1, 0.3, 1.0])
        print(sgd.describe(), evaluate(sgd.model).line())
    """
    if not isinstance(model, MetaLSTM):
        raise MetaLSTMError(
            f"the SGD ablation needs a meta-learner LSTM checkpoint, not a {model.name!r} one"
        )
    if not lrs or any(not 0 < lr < math.inf for lr in lrs):
        raise MetaLSTMError(f"SGD steps must be positive numbers, got {list(lrs)}")
    theta0 = model.cell.theta0.detach()
    candidates = {lr: sgd_from_init(model.config, theta0, lr) for lr in lrs}
    if len(candidates) == 1:
        ((lr, sgd),) = candidates.items()
        return SGDAblation(sgd, lr, {})
    config = model.config
    episodes = val_episodes or config.val_episodes
    scores = {}
    for lr, sgd in candidates.items():
        with surrounding(f"SGD lr {lr:g} | "):
            result = evaluate(
                sgd, part="val", episodes=episodes, seed=config.val_seed, progress=progress
            )
        scores[lr] = result.mean
    best = max(scores, key=scores.__getitem__)
    return SGDAblation(candidates[best], best, scores)
