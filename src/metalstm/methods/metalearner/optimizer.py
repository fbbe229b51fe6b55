"""The meta-learner's learned update rule as a ``torch.optim`` optimizer for any model.

The meta-learner of Ravi & Larochelle (2017) is coordinate-wise: every scalar parameter is updated
by the same small network from its own gradient, the shared loss and its own recurrent state, so
the rule applies to any parameter vector, not only to the learner it was meta-trained with. For
every coordinate θ of every parameter, one :meth:`MetaLSTMOptimizer.step` runs the two layers of
:class:`~metalstm.metalearner.MetaLearnerCell`:

    (h, c)  = LSTM_1([preprocess(g), preprocess(L)], (h, c))
    f, i    = W_F,I · [h, θ, (f, i)_prev] + b_F,I
    θ      ← σ(f) θ − σ(i) g

with the layer-1 state (h, c) and the previous gate logits kept per coordinate in the
optimizer's ``state`` (so ``state_dict()`` / ``load_state_dict()`` work as for Adam). What is
*not* used is the learned initialisation c_0 = θ_0: that belongs to the learner architecture the
meta-learner was trained with; here the model keeps its own parameters as the starting point.

Things to know before relying on it:

* the rule was meta-trained for T inner steps (12 for the Omniglot presets) on a conv-4 learner
  with batch norm and a cross-entropy loss; far longer runs, other architectures or other losses
  are extrapolation (see ``examples/optimizer_comparison.py`` for how it fares);
* the forget gate σ(f) < 1 shrinks every parameter each step, like a learned weight decay;
* ``grad_scale`` multiplies the gradient before it reaches the meta-learner (use
  ``1 / batch_size`` to mimic a checkpoint trained with ``grad_divide_batch``);
* ``reset_interval=R`` restarts the per-coordinate LSTM state every R steps (the parameters are
  kept), which keeps the recurrent state in the range of steps it was trained on.

Example::

    from metalstm.methods.metalearner.optimizer import MetaLSTMOptimizer

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 5))
    optimizer = MetaLSTMOptimizer(model.parameters(), "runs/omniglot/best")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(12):
        loss = optimizer.step(closure)   # the meta-learner needs the loss value: pass a closure
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import CheckpointError, ConfigError
from ..base import Method
from .cell import CellState, MetaLearnerCell
from .method import MetaLSTM

__all__ = ["MetaLSTMOptimizer", "learned_update_rule"]

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


def learned_update_rule(source: Method | MetaLearnerCell | str | Path) -> MetaLearnerCell:
    """The meta-learner cell of a model, or of a checkpoint path / run folder / shipped name."""
    if isinstance(source, MetaLearnerCell):
        return source
    if isinstance(source, MetaLSTM):
        return source.cell
    if isinstance(source, Method):
        raise ConfigError(
            f"a {source.name!r} model has no learned update rule; pass a meta-learner LSTM"
        )
    if isinstance(source, str | Path):
        from ...serialization import load_method

        model, meta = load_method(source)
        if not isinstance(model, MetaLSTM):
            raise CheckpointError(
                f"{meta['path']} holds a {model.name!r} model, which has no learned update rule; "
                "pass a meta-learner LSTM checkpoint"
            )
        return model.cell
    raise ConfigError(
        f"cannot take an update rule from a {type(source).__name__}; pass a MetaLSTM, its "
        "MetaLearnerCell, or a checkpoint path, run folder or shipped name"
    )


class MetaLSTMOptimizer(torch.optim.Optimizer):
    """Applies a meta-learner's learned update rule coordinate-wise to any parameters.

    Args:
        params: the parameters (or parameter groups) to optimise, as for any optimizer.
        meta_learner: a :class:`~metalstm.metalearner.MetaLSTM`, its cell, or a checkpoint
            (path, run folder or shipped name). The cell is copied: later changes to the source
            do not affect this optimizer.
        grad_scale: factor applied to the gradient before the meta-learner sees it (per group).
        reset_interval: restart the per-coordinate LSTM state every this many steps (None:
            never). The parameters themselves are never reset.

    :meth:`step` needs the loss value (the meta-learner's second input): pass a closure that
    zeroes the gradients, computes the loss, calls ``backward()`` and returns it, or pass
    ``loss=`` after calling ``backward()`` yourself. Parameters without a gradient are skipped.
    """

    def __init__(
        self,
        params: Params,
        meta_learner: Method | MetaLearnerCell | str | Path,
        *,
        grad_scale: float = 1.0,
        reset_interval: int | None = None,
    ) -> None:
        if not grad_scale > 0:
            raise ConfigError(f"grad_scale={grad_scale!r} is invalid; give a positive factor")
        if reset_interval is not None and reset_interval < 1:
            raise ConfigError(f"reset_interval={reset_interval!r} is invalid; give at least 1")
        super().__init__(params, {"grad_scale": float(grad_scale)})
        cell = copy.deepcopy(learned_update_rule(meta_learner))
        cell.requires_grad_(False)
        self.reset_interval = reset_interval
        self._cells: dict[torch.device, MetaLearnerCell] = {cell.theta0.device: cell}
        with torch.no_grad():
            template = cell.initial_state()
        self._n_template = template.theta.numel()
        self._theta_shape = tuple(template.theta.shape)
        # One coordinate of each recurrent field (all but θ) of the cell's initial state: the
        # per-coordinate start values, whatever the state layout of the cell.
        self._start: dict[str, tuple[Tensor, int]] = {}
        for item in dataclasses.fields(CellState):
            if item.name == "theta":
                continue
            value = getattr(template, item.name)
            dims = [d for d, size in enumerate(value.shape) if size == self._n_template]
            if dims:
                self._start[item.name] = (value.narrow(dims[-1], 0, 1).clone(), dims[-1])
            else:
                self._start[item.name] = (value.clone(), -1)

    @property
    def cell(self) -> MetaLearnerCell:
        """The (copied) meta-learner cell that computes the updates."""
        return next(iter(self._cells.values()))

    def _cell_on(self, device: torch.device) -> MetaLearnerCell:
        if device not in self._cells:
            self._cells[device] = copy.deepcopy(self.cell).to(device)
        return self._cells[device]

    def _shape(self, numel: int, shape: tuple[int, ...]) -> list[int]:
        return [numel if size == self._n_template else size for size in shape]

    def _fresh_state(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The initial recurrent state of ``numel`` coordinates."""
        state: dict[str, Any] = {}
        for name, (value, dim) in self._start.items():
            value = value.to(device, dtype)
            if dim >= 0:
                shape = list(value.shape)
                shape[dim] = numel
                value = value.expand(shape)
            state[name] = value.clone(memory_format=torch.contiguous_format)
        state["step"] = 0
        return state

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | float | None = None
    ) -> Tensor:
        """One learned update of every parameter with a gradient; returns the loss."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ConfigError(
                "MetaLSTMOptimizer.step needs the loss: pass a closure that zeroes the "
                "gradients, computes the loss, calls backward() and returns it, or pass loss="
            )
        loss_value = torch.as_tensor(loss).detach().float().reshape(-1)
        if loss_value.numel() != 1:
            raise ConfigError(f"the loss must be a scalar, got {loss_value.numel()} values")
        for group in self.param_groups:
            scale = group["grad_scale"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ConfigError("MetaLSTMOptimizer does not support sparse gradients")
                self._update(p, grad, loss_value.reshape(()), scale)
        return torch.as_tensor(loss).detach()

    def _update(self, p: Tensor, grad: Tensor, loss: Tensor, scale: float) -> None:
        cell = self._cell_on(p.device)
        dtype = cell.theta0.dtype
        state = self.state[p]
        interval = self.reset_interval
        if not state or (interval is not None and state["step"] % interval == 0):
            step = state.get("step", 0)
            state.update(self._fresh_state(p.numel(), p.device, dtype))
            state["step"] = step
        shape = self._shape(p.numel(), self._theta_shape)
        values = {name: state[name].to(dtype) for name in self._start}
        current = CellState(theta=p.detach().to(dtype).reshape(shape), **values)
        scaled = grad.detach().to(dtype).reshape(shape) * scale
        new, _ = cell.update(current, loss.to(p.device, dtype), scaled)
        p.copy_(new.theta.reshape(p.shape))
        for name in self._start:
            state[name] = getattr(new, name)
        state["step"] += 1
