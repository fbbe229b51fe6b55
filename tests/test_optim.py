"""MetaLSTMOptimizer: the learned update rule, coordinate-wise, on any model's parameters."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalstm.checkpoint import save_checkpoint
from metalstm.config import Config
from metalstm.errors import ConfigError
from metalstm.methods import build_method
from metalstm.methods.metalearner import CellState, MetaLearnerCell, MetaLSTM
from metalstm.methods.metalearner.optimizer import MetaLSTMOptimizer
from metalstm.serialization import method_tensors


def meta_model(**values: object) -> MetaLSTM:
    model = build_method(Config.from_dict({"filters": 4, "inner_steps": 3, **values}))
    assert isinstance(model, MetaLSTM)
    return model


def small_problem(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    return net, x, y


def closure_for(
    net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def test_untrained_rule_decreases_the_loss() -> None:
    """At the paper's initialisation the rule is ~SGD (σ(i) ≈ 0.01) with a slight shrinkage."""
    net, x, y = small_problem()
    optimizer = MetaLSTMOptimizer(net.parameters(), meta_model(), grad_scale=10.0)
    closure = closure_for(net, optimizer, x, y)
    losses = [float(optimizer.step(closure)) for _ in range(25)]
    assert losses[-1] < losses[0] - 0.05
    assert all(b <= a + 1e-4 for a, b in itertools.pairwise(losses))


def test_state_has_the_cell_layout_for_each_parameter() -> None:
    model = meta_model()
    template = model.cell.initial_state()
    n = template.theta.numel()
    net, x, y = small_problem()
    optimizer = MetaLSTMOptimizer(net.parameters(), model)
    optimizer.step(closure_for(net, optimizer, x, y))
    for p in net.parameters():
        state = optimizer.state[p]
        assert state["step"] == 1
        for item in dataclasses.fields(CellState):
            if item.name == "theta":
                continue
            expected = [p.numel() if s == n else s for s in getattr(template, item.name).shape]
            assert list(state[item.name].shape) == expected, item.name
            assert torch.isfinite(state[item.name]).all()


def test_update_is_exactly_the_gate_rule() -> None:
    """With W_F = W_I = 0 the gates are the biases: θ ← σ(b_F) θ − σ(b_I) g, for every tensor."""
    model = meta_model()
    with torch.no_grad():
        model.cell.gate_weight.zero_()
        model.cell.gate_bias.copy_(torch.tensor([2.0, -1.0]))
    net, x, y = small_problem()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = MetaLSTMOptimizer(net.parameters(), model, grad_scale=0.5)
    optimizer.step(closure_for(net, optimizer, x, y))
    forget, lr = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))
    for old, p in zip(before, net.parameters(), strict=True):
        assert p.grad is not None
        assert torch.allclose(p, forget * old - lr * 0.5 * p.grad, atol=1e-6)


def test_reproduces_the_meta_learners_inner_loop() -> None:
    """On the learner's own module, from θ_0, T steps give the inner loop's θ_T."""
    model = meta_model(inner_steps=4)
    generator = torch.Generator().manual_seed(1)
    support_x = torch.rand(10, 1, 28, 28, generator=generator)
    support_y = torch.arange(5).repeat(2)
    with torch.no_grad():
        expected = model.inner_loop(support_x, support_y, 4).theta
    net = copy.deepcopy(model.learner.net)
    nn.utils.vector_to_parameters(model.cell.theta0.detach().clone(), net.parameters())
    optimizer = MetaLSTMOptimizer(net.parameters(), model)
    closure = closure_for(net, optimizer, support_x, support_y)
    for _ in range(4):
        optimizer.step(closure)
    got = nn.utils.parameters_to_vector(net.parameters()).detach()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip_continues_identically() -> None:
    model = meta_model()
    net, x, y = small_problem()
    optimizer = MetaLSTMOptimizer(net.parameters(), model)
    for _ in range(3):
        optimizer.step(closure_for(net, optimizer, x, y))
    twin = copy.deepcopy(net)
    restored = MetaLSTMOptimizer(twin.parameters(), model)
    restored.load_state_dict(optimizer.state_dict())
    for _ in range(2):
        optimizer.step(closure_for(net, optimizer, x, y))
        restored.step(closure_for(twin, restored, x, y))
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loss_argument_and_skipped_parameters() -> None:
    model = meta_model()
    net, x, y = small_problem()
    frozen = nn.Parameter(torch.ones(3))  # never gets a gradient
    optimizer = MetaLSTMOptimizer([*net.parameters(), frozen], model)
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        assert torch.equal(optimizer.step(loss=loss), loss.detach())
    assert frozen not in optimizer.state and torch.equal(frozen, torch.ones(3))
    assert optimizer.state[next(net.parameters())]["step"] == 3


def test_reset_interval_restarts_the_recurrent_state() -> None:
    """reset_interval=1: every step is the first step of a fresh optimizer."""
    model = meta_model()
    net, x, y = small_problem()
    twin = copy.deepcopy(net)
    resetting = MetaLSTMOptimizer(net.parameters(), model, reset_interval=1)
    for _ in range(2):
        resetting.step(closure_for(net, resetting, x, y))
        fresh = MetaLSTMOptimizer(twin.parameters(), model)
        fresh.step(closure_for(twin, fresh, x, y))
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_from_checkpoint_and_bad_input(tmp_path: Path) -> None:
    model = meta_model()
    path = save_checkpoint(
        tmp_path / "m",
        method_tensors(model),
        {"algorithm": "lstm", "config": model.config.to_dict()},
    )
    net, _, _ = small_problem()
    from_file = MetaLSTMOptimizer(net.parameters(), str(path))
    assert torch.equal(from_file.cell.gate_bias, model.cell.gate_bias)
    with pytest.raises(ConfigError, match="needs the loss"):
        from_file.step()
    with pytest.raises(ConfigError, match="grad_scale"):
        MetaLSTMOptimizer(net.parameters(), model, grad_scale=0)
    with pytest.raises(ConfigError, match="reset_interval"):
        MetaLSTMOptimizer(net.parameters(), model, reset_interval=0)
    with pytest.raises(ConfigError, match=r"cannot take an update rule from a Linear"):
        MetaLSTMOptimizer(net.parameters(), nn.Linear(2, 2))  # type: ignore[arg-type]


class TransposedCell(MetaLearnerCell):
    """The same rule with the recurrent state stored [n, H] instead of [H, n]."""

    def initial_state(self) -> CellState:
        s = super().initial_state()
        return CellState(s.theta, s.gate_logits.T.clone(), s.hidden.T.clone(), s.cell.T.clone())

    def forward(
        self, state: CellState, loss: Tensor, grad: Tensor, last: bool = False
    ) -> tuple[CellState, Tensor]:
        inner = CellState(state.theta, state.gate_logits.T, state.hidden.T, state.cell.T)
        new, gates = super().forward(inner, loss, grad, last)
        return CellState(new.theta, new.gate_logits.T, new.hidden.T, new.cell.T), gates


def test_state_follows_the_cells_own_layout() -> None:
    """Only initial_state()/forward() are used: another state layout works unchanged."""
    model = meta_model()
    transposed = TransposedCell(model.cell.theta0.detach(), model.cell.hidden_size)
    transposed.load_state_dict(model.cell.state_dict())
    net, x, y = small_problem()
    twin = copy.deepcopy(net)
    plain = MetaLSTMOptimizer(net.parameters(), model)
    other = MetaLSTMOptimizer(twin.parameters(), transposed)
    for _ in range(3):
        plain.step(closure_for(net, plain, x, y))
        other.step(closure_for(twin, other, x, y))
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert other.state[b]["hidden"].shape == (b.numel(), model.cell.hidden_size)
        assert torch.allclose(other.state[b]["hidden"], plain.state[a]["hidden"].T, atol=1e-6)
