"""The meta-learner LSTM of Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning"
(ICLR 2017), as the authors' code implements it, behind the :class:`~metalstm.methods.base.Method`
interface.

The learner's parameters θ are the cell state of a two-layer, coordinate-wise LSTM
(:mod:`.cell`), run for T steps on the support set by the shared inner loop
(:func:`metalstm.inner_loop.run_inner_loop`). After T steps the learner's query loss at θ_T is
the meta-training loss. First-order by default: L_t and g_t enter as constants (the paper's
simplification), while the chain θ_{t-1} → θ_t, the gate recurrence and layer 1's state are
differentiated.

Example::

    from metalstm import MetaLSTM, override, Config
    model = MetaLSTM(override(Config(), {"n_way": 5, "k_shot": 1, "inner_steps": 12}))
    logits = model.predict(support_x, support_y, query_x)   # [N*Q, N]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ...config import Config
from ...inner_loop import InnerLoopResult, InnerLoopSettings, run_inner_loop
from ...registry import register
from ..base import InnerLoopMethod
from .cell import MetaLearnerCell


@dataclass(frozen=True)
class LSTMSettings(InnerLoopSettings):
    """The meta-learner's own settings (defaults: the paper's)."""

    hidden_size: int = 20  # layer-1 LSTM of the meta-learner
    preprocess_p: float = 10.0  # Andrychowicz et al. (2016) gradient preprocessing
    second_order: bool = False  # differentiate through the learner's gradients
    grad_divide_batch: bool = False  # authors' quirk: divide the mean gradient by the batch size
    theta0_lr_scale: float = 1.0  # c_0's meta learning rate, as a multiple of the LSTM's (lr)
    limits: ClassVar[Mapping[str, int]] = {**InnerLoopSettings.limits, "hidden_size": 1024}

    def checks(self) -> dict[str, bool]:
        return {
            **super().checks(),
            "hidden_size": self.hidden_size >= 1,
            "theta0_lr_scale": self.theta0_lr_scale > 0,
        }


@register(
    "lstm",
    title="Meta-learner LSTM",
    settings=LSTMSettings,
    reference="Ravi & Larochelle, ICLR 2017",
    # Ravi & Larochelle (2017), Table 1.
    published={("miniimagenet", 5, 1): 43.44, ("miniimagenet", 5, 5): 60.60},
)
class MetaLSTM(InnerLoopMethod):
    """Ravi & Larochelle's meta-learner LSTM (the paper's Method 1), behind :class:`Method`.

    Reference: S. Ravi and H. Larochelle, "Optimization as a Model for Few-Shot Learning",
    ICLR 2017. Example::

        model = MetaLSTM(load_preset("omniglot-5w1s"))
        out = model.meta_loss(episode); out.loss.backward()   # meta-training step
        labels = model.predict(support_x, support_y, query_x).argmax(-1)
    """

    settings: LSTMSettings

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.cell = MetaLearnerCell(
            self.initial_theta(), self.settings.hidden_size, self.settings.preprocess_p
        )
        self.cell.use_compile = config.compile

    @property
    def theta0(self) -> nn.Parameter:
        return self.cell.theta0

    def param_groups(self) -> list[dict[str, Any]]:
        """c_0 at ``theta0_lr_scale`` x the meta learning rate, the LSTM's weights at 1 x (one
        group when the scale is 1, as in the paper)."""
        if self.settings.theta0_lr_scale == 1.0:
            return super().param_groups()
        theta0 = self.cell.theta0
        rest = [p for p in self.parameters() if p is not theta0]
        return [
            {"params": [theta0], "lr_scale": self.settings.theta0_lr_scale},
            {"params": rest},
        ]

    def inner_loop(
        self, support_x: Tensor, support_y: Tensor, steps: int, record_gates: bool = False
    ) -> InnerLoopResult:
        """T updates of the learner on the support set by the meta-learner (Method 1, l. 5-10).

        Builds the meta-graph only when gradients are enabled; under ``torch.no_grad`` it is the
        evaluation-time optimiser (the learner's own gradient is still computed). With
        ``record_gates`` the result's ``infos`` are the gates σ(f_t), σ(i_t) [2, n] per step.
        """
        settings = self.settings
        scale = 1.0 / support_y.shape[-1] if settings.grad_divide_batch else 1.0
        theta0, start = self.episode_start(self.cell.theta0, support_x, support_y)
        return run_inner_loop(
            self.learner,
            self.cell,
            theta0,
            support_x,
            support_y,
            steps,
            second_order=settings.second_order,
            grad_scale=scale,
            record_info=record_gates,
            **start,
        )

    def adaptation(self) -> str:
        return f"T = {self.settings.eval_steps}"
