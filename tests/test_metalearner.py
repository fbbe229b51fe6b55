"""The meta-learner of Ravi & Larochelle (2017): preprocessing, initialisation, one cell update by
hand, first- and second-order meta-gradients against finite differences, and the per-episode
batch-norm protocol (SPEC section 1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import reference_net, small_config
from metalstm import Config, Learner, MetaLearnerCell, MetaLSTM, build_method, preprocess
from metalstm import inner_loop as ml
from metalstm.data import Episode
from metalstm.errors import ConfigError
from metalstm.learner import BatchNormState
from metalstm.methods.base import learner_shape
from metalstm.methods.metalearner import CellState

P = 10.0
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers ------------------------------------------------------------------------------------


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    """|actual − expected| ≤ atol + rtol·|expected| elementwise, same shape and dtype.

    (torch.testing.assert_close costs seconds of lazy imports on its first call.)
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    diff = (actual.detach() - expected.detach()).abs()
    bound = atol + rtol * expected.detach().abs()
    bad = ~(diff <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())}/{diff.numel()} elements differ; max abs diff {diff.max().item():.3e}; "
        f"actual {actual.detach().flatten()[:6].tolist()} expected "
        f"{expected.detach().flatten()[:6].tolist()}"
    )


def random_episode(cfg: Config, seed: int, dtype: torch.dtype = torch.float64) -> Episode:
    """An episode of random images in [0, 1] with class-major labels, as the sampler makes them."""
    g = torch.Generator().manual_seed(seed)
    n, k, q, s = cfg.n_way, cfg.k_shot, cfg.q_query, cfg.image_size
    return Episode(
        support_x=torch.rand(n * k, cfg.channels, s, s, generator=g, dtype=dtype),
        support_y=torch.arange(n).repeat_interleave(k),
        query_x=torch.rand(n * q, cfg.channels, s, s, generator=g, dtype=dtype),
        query_y=torch.arange(n).repeat_interleave(q),
        classes=torch.arange(n),
        support_ids=torch.arange(n * k),
        query_ids=torch.arange(n * q),
    )


def scramble(model: MetaLSTM, seed: int) -> None:
    """Move the meta-parameters away from the paper's near-identity initialisation.

    At the paper's init (weights ±0.01, σ(i) ≈ 0.01) most partial derivatives are ~1e-6 and a
    finite-difference check of them says nothing; the identity must hold at any φ.
    """
    g = torch.Generator().manual_seed(seed)
    cell = model.cell
    with torch.no_grad():
        for p in (cell.lstm_weight, cell.lstm_bias, cell.gate_weight):
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        cell.gate_bias.copy_(torch.tensor([1.5, -1.0], dtype=cell.gate_bias.dtype))
        cell.theta0.add_(
            0.05 * torch.randn(cell.theta0.shape, generator=g, dtype=cell.theta0.dtype)
        )


def double_model(cfg: Config, seed: int = 7) -> MetaLSTM:
    model = build_method(cfg).double()
    assert isinstance(model, MetaLSTM)
    scramble(model, seed)
    return model


Record = list[tuple[Tensor, Tensor, Tensor]]  # (θ_{t-1}, L_t, g_t) per inner step


@contextmanager
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[Record]:
    """Record the θ, loss and gradient of every call of the learner's loss-and-gradient."""
    record: Record = []
    real = ml.learner_loss_and_grad

    def spy(learner, theta, x, y, bn, second_order, batch_stats=True):  # type: ignore[no-untyped-def]
        loss, grad = real(learner, theta, x, y, bn, second_order, batch_stats)
        record.append((theta.detach().clone(), loss.detach().clone(), grad.detach().clone()))
        return loss, grad

    with monkeypatch.context() as m:
        m.setattr(ml, "learner_loss_and_grad", spy)
        yield record


def replayed_objective(
    model: MetaLSTM, record: Record, episode: Episode, support_bn: BatchNormState | None = None
) -> Tensor:
    """The first-order objective: query loss at θ_T with (L_t, g_t) held at recorded values, and
    the query normalised by its batch statistics or by held ``support_bn`` running statistics."""
    state = model.cell.initial_state()
    for _, loss, grad in record:
        state, _ = model.cell(state, loss, grad)
    if support_bn is None:
        bn = model.learner.fresh_batchnorm_state(dtype=episode.query_x.dtype)
        logits = model.learner(state.theta, episode.query_x, bn, batch_stats=True)
    else:
        logits = model.learner(state.theta, episode.query_x, support_bn, batch_stats=False)
    return F.cross_entropy(logits, episode.query_y)


def meta_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def autograd_grads(model: nn.Module, objective: Callable[[], Tensor]) -> dict[str, Tensor]:
    params = meta_params(model)
    grads = torch.autograd.grad(objective(), list(params.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), grads)
    }


def central_difference(
    model: nn.Module, objective: Callable[[], Tensor], direction: dict[str, Tensor], eps: float
) -> float:
    """(J(φ + εd) − J(φ − εd)) / 2ε, restoring φ afterwards."""
    params = meta_params(model)
    saved = {k: p.detach().clone() for k, p in params.items()}
    values = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():  # the value does not depend on the graph being built
                for name, d in direction.items():
                    params[name].copy_(saved[name] + sign * eps * d)
                values.append(float(objective()))
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
    return (values[0] - values[1]) / (2 * eps)


def stable_difference(
    model: nn.Module, objective: Callable[[], Tensor], direction: dict[str, Tensor]
) -> float:
    """A central difference that two step sizes agree on.

    The full (second-order) objective is only piecewise smooth: the learner's gradient g_t(θ)
    jumps where a ReLU or a max-pool switches, so J(φ) has tiny jumps. A step that straddles one
    gives a central difference that changes with the step; one that does not, a stable value.
    """
    tried = []
    for eps in (1e-6, 1e-7, 3e-8):
        a = central_difference(model, objective, direction, eps)
        b = central_difference(model, objective, direction, eps / 2)
        if abs(a - b) <= 1e-7 * abs(a) + 1e-14 / eps:
            return b
        tried.append((eps, a, b))
    raise AssertionError(f"no stable finite difference: {tried}")


def check_against_fd(
    model: nn.Module,
    objective: Callable[[], Tensor],
    grads: dict[str, Tensor],
    *,
    seed: int,
    coords: int = 2,
    per_tensor_direction: bool = True,
) -> None:
    """Gradient vs central differences: a random direction over everything, one per tensor, and
    a few single coordinates of every tensor (plus its largest-gradient one)."""
    g = torch.Generator().manual_seed(seed)
    params = meta_params(model)
    assert set(grads) == set(params)

    def check(direction: dict[str, Tensor], what: str) -> None:
        analytic = sum(float((grads[k] * d).sum()) for k, d in direction.items())
        numeric = stable_difference(model, objective, direction)
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), what

    everything = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    check(everything, "random direction over all meta-parameters")
    for name, p in params.items():
        if per_tensor_direction:
            check({name: everything[name]}, f"random direction of {name}")
        flat = grads[name].reshape(-1)
        picks = torch.randint(flat.numel(), (coords,), generator=g).tolist()
        picks.append(int(flat.abs().argmax()))
        for index in picks:
            d = torch.zeros(p.numel(), dtype=p.dtype)
            d[index] = 1.0
            check({name: d.view(p.shape)}, f"{name}[{index}]")


# -- 1. preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preprocess_chosen_values(dtype: torch.dtype) -> None:
    threshold = math.exp(-P)
    cases = {
        # value: (log-magnitude feature, sign feature), by hand
        1.0: (0.0, 1.0),
        -2.5: (math.log(2.5) / P, -1.0),
        1e-3: (math.log(1e-3) / P, 1.0),
        -1e-3: (math.log(1e-3) / P, -1.0),
        1e-6: (-1.0, math.exp(P) * 1e-6),
        -1e-6: (-1.0, -math.exp(P) * 1e-6),
        0.0: (-1.0, 0.0),
        1e4: (math.log(1e4) / P, 1.0),
    }
    x = torch.tensor(list(cases), dtype=dtype)
    out = preprocess(x, P)
    assert out.shape == (len(cases), 2)
    assert out.dtype == dtype
    expected = torch.tensor(list(cases.values()), dtype=dtype)
    assert_close(out, expected, rtol=1e-6, atol=1e-7)
    # the exact branch taken: the small branch's log feature is exactly -1, the big one's sign ±1
    assert out[x.abs() < threshold, 0].eq(-1.0).all()
    assert out[x.abs() >= threshold, 1].abs().eq(1.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preprocess_threshold(dtype: torch.dtype) -> None:
    """|x| = e^-p belongs to the log branch; just below it the linear branch; both meet at
    (−1, ±1), so the features are continuous across the threshold."""
    at = torch.exp(torch.tensor(-P, dtype=dtype))  # e^-p in the input's precision
    below = torch.nextafter(at, torch.zeros((), dtype=dtype))
    x = torch.stack([at, -at, below, -below])
    out = preprocess(x, P)
    # at the threshold: (log|x| / p, sign x), exactly the sign
    assert out[0, 1].item() == 1.0 and out[1, 1].item() == -1.0
    assert_close(out[:2, 0], torch.full((2,), -1.0, dtype=dtype))
    # just below: (−1, e^p · x), exactly −1 in the first feature, |e^p · x| just under 1
    assert out[2, 0].item() == -1.0 and out[3, 0].item() == -1.0
    assert 0.999 < out[2, 1].item() <= 1.0 and -1.0 <= out[3, 1].item() < -0.999
    # continuity across the threshold
    assert_close(out[2:], out[:2], rtol=1e-5, atol=1e-5)


def test_preprocess_shape_and_other_p() -> None:
    x = torch.tensor([[0.5, -3e-3, 2e-5], [1e-9, -7.0, 0.0]])
    out = preprocess(x, 5.0)
    assert out.shape == (2, 3, 2)
    for i in range(2):
        for j in range(3):
            v = float(x[i, j])
            if abs(v) >= math.exp(-5.0):
                want = (math.log(abs(v)) / 5.0, math.copysign(1.0, v))
            else:
                want = (-1.0, math.exp(5.0) * v)
            assert out[i, j].tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    # e^-10 < 1e-3 < e^-5: the log branch with p = 10, the linear one with p = 5
    assert_close(preprocess(torch.tensor(1e-3), 10.0), torch.tensor([math.log(1e-3) / 10.0, 1.0]))
    assert_close(preprocess(torch.tensor(1e-3), 5.0), torch.tensor([-1.0, math.exp(5.0) * 1e-3]))


def test_preprocess_float64_linear_branch_is_exact() -> None:
    """In float64 the linear branch should be e^p · x to float64 precision."""
    x = torch.tensor([1e-6, -3e-7, 4e-5], dtype=torch.float64)
    out = preprocess(x, P)
    expected = torch.tensor([math.exp(P) * v for v in x.tolist()], dtype=torch.float64)
    assert_close(out[:, 1], expected, rtol=1e-12, atol=0.0)


# -- 2. initialisation --------------------------------------------------------------------------


def test_initialisation_ranges_and_theta0() -> None:
    cfg = Config(n_way=5, filters=8, seed=3, device="cpu")
    model = build_method(cfg)
    assert isinstance(model, MetaLSTM)
    cell = model.cell
    b_f, b_i = cell.gate_bias.tolist()
    assert 4.0 <= b_f <= 5.0
    assert -5.0 <= b_i <= -4.0
    for name in ("lstm_weight", "lstm_bias", "gate_weight"):
        p = getattr(cell, name).detach()
        assert p.abs().max() <= 0.01, name
        # actually drawn from U(±0.01), not left at zero or constant
        assert p.abs().max() > 0.005 and p.std() > 0.003, name
    h = cfg.settings.hidden_size
    assert cell.lstm_weight.shape == (4 * h, 4 + h)
    assert cell.gate_weight.shape == (2, h + 2)
    # the meta-parameters are exactly these five tensors
    assert {n for n, _ in model.named_parameters()} == {
        "cell.lstm_weight",
        "cell.lstm_bias",
        "cell.gate_weight",
        "cell.gate_bias",
        "cell.theta0",
    }

    # θ_0 = c_0 is the learner's own default initialisation under the config's seed
    torch.manual_seed(cfg.seed)
    reference = Learner(learner_shape(cfg), cfg.bn_momentum, cfg.bn_eps)
    assert_close(cell.theta0.detach(), reference.initial_theta(), rtol=0, atol=0)
    assert_close(cell.theta0.detach(), model.learner.initial_theta(), rtol=0, atol=0)
    assert cell.theta0.requires_grad  # c_0 is trained, not frozen
    groups = dict(model.learner.parameter_groups())
    for name, where in groups.items():
        values = cell.theta0.detach()[where]
        if name.endswith("norm.weight"):
            assert values.eq(1.0).all(), name
        elif name.endswith("norm.bias"):
            assert values.eq(0.0).all(), name
        else:  # PyTorch's default for conv / linear: U(±1/sqrt(fan_in))
            fan_in = model.learner.shapes[model.learner.names.index(name.replace("bias", "weight"))]
            bound = 1.0 / math.sqrt(math.prod(fan_in[1:]))
            assert values.abs().max() <= bound + 1e-7, name
            assert values.abs().max() > 0.5 * bound, name


def test_build_is_a_function_of_the_seed() -> None:
    cfg = Config(n_way=5, filters=8, seed=11, device="cpu")
    rng_before = torch.get_rng_state()
    a = build_method(cfg).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random state is untouched
    torch.manual_seed(12345)  # and the global state does not leak into the build
    b = build_method(cfg).state_dict()
    c = build_method(Config(n_way=5, filters=8, seed=12, device="cpu")).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert not torch.equal(a[key], c[key]), key


# -- 3. one cell update by hand -----------------------------------------------------------------


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _features(value: float) -> list[float]:
    if abs(value) >= math.exp(-P):
        return [math.log(abs(value)) / P, math.copysign(1.0, value)]
    return [-1.0, math.exp(P) * value]


def hand_step(
    w: list[list[float]],
    b: list[float],
    gw: list[list[float]],
    gb: list[float],
    hidden: int,
    state: dict[str, list],
    loss: float,
    grad: list[float],
) -> dict[str, list]:
    """One step of the two-layer coordinate-wise meta-learner, coordinate by coordinate.

    Layer 1: a standard LSTM; the rows of ``w`` are the (input, forget, output, candidate) gates
    and its columns act on [features of g (2), features of L (2), h_{t-1} (hidden)].
    Layer 2: logits = gw · [h_t, θ_{t-1}, previous logit] + gb, rows (forget, input);
    θ_t = σ(f) θ_{t-1} − σ(i) g.
    """
    new: dict[str, list] = {"theta": [], "logits": [], "h": [], "c": [], "gates": []}
    for j, g in enumerate(grad):
        inputs = _features(g) + _features(loss) + [state["h"][j][k] for k in range(hidden)]
        z = [sum(w[r][c] * inputs[c] for c in range(len(inputs))) + b[r] for r in range(4 * hidden)]
        i_gate = [_sigmoid(v) for v in z[:hidden]]
        f_gate = [_sigmoid(v) for v in z[hidden : 2 * hidden]]
        o_gate = [_sigmoid(v) for v in z[2 * hidden : 3 * hidden]]
        cand = [math.tanh(v) for v in z[3 * hidden :]]
        c = [f_gate[k] * state["c"][j][k] + i_gate[k] * cand[k] for k in range(hidden)]
        h = [o_gate[k] * math.tanh(c[k]) for k in range(hidden)]
        theta = state["theta"][j]
        logits = []
        for row in range(2):  # 0: forget, 1: input
            prev = state["logits"][j][row]
            value = sum(gw[row][k] * h[k] for k in range(hidden))
            logits.append(value + gw[row][hidden] * theta + gw[row][hidden + 1] * prev + gb[row])
        sf, si = _sigmoid(logits[0]), _sigmoid(logits[1])
        new["theta"].append(sf * theta - si * g)
        new["logits"].append(logits)
        new["h"].append(h)
        new["c"].append(c)
        new["gates"].append([sf, si])
    return new


def hand_cell(hidden: int) -> tuple[MetaLearnerCell, dict[str, list]]:
    """A cell with n = 3, H = ``hidden`` and known, distinct, non-symmetric weights."""
    theta0 = torch.tensor([0.3, -0.8, 1.2], dtype=F64)
    cell = MetaLearnerCell(theta0, hidden_size=hidden, p=P).double()
    values = {
        "w": [
            [0.05 * ((3 * r + 5 * c) % 11) - 0.25 for c in range(4 + hidden)]
            for r in range(4 * hidden)
        ],
        "b": [0.1 * r - 0.35 for r in range(4 * hidden)],
        "gw": [[0.4, -0.6, 0.9, 0.3], [-0.2, 0.7, -0.5, -0.7]],  # columns (h1, h2, θ, prev)
        "gb": [2.0, -1.5],
    }
    assert hidden == 2
    with torch.no_grad():
        cell.lstm_weight.copy_(torch.tensor(values["w"], dtype=F64))
        cell.lstm_bias.copy_(torch.tensor(values["b"], dtype=F64))
        cell.gate_weight.copy_(torch.tensor(values["gw"], dtype=F64))
        cell.gate_bias.copy_(torch.tensor(values["gb"], dtype=F64))
    return cell, values


# step 1 covers both preprocessing branches (|g| = 2e-5 < e^-10 ≈ 4.5e-5) and a loss above 1,
# step 2 other signs and a loss below 1 (negative log feature)
HAND_STEPS = [(1.7, [0.5, -2e-3, 2e-5]), (0.4, [-1.3, 7e-6, 0.02])]


@pytest.mark.parametrize("graph", [False, True], ids=["no-grad", "autograd"])
def test_cell_two_steps_against_hand_computation(graph: bool) -> None:
    hidden = 2
    cell, v = hand_cell(hidden)
    state = cell.initial_state()
    assert torch.equal(state.theta, cell.theta0)
    assert state.gate_logits.eq(0).all() and state.hidden.eq(0).all() and state.cell.eq(0).all()
    hand = {
        "theta": cell.theta0.tolist(),
        "logits": [[0.0, 0.0] for _ in range(3)],
        "h": [[0.0] * hidden for _ in range(3)],
        "c": [[0.0] * hidden for _ in range(3)],
    }
    # 1e-7, not 1e-12: the package's e^p of the linear branch is a float32 constant (see
    # test_preprocess_float64_linear_branch_is_exact); any error in the cell is orders larger
    tol = {"rtol": 1e-7, "atol": 1e-8}
    with torch.set_grad_enabled(graph):
        for loss, grad in HAND_STEPS:
            state, gates = cell(state, torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64))
            hand = hand_step(v["w"], v["b"], v["gw"], v["gb"], hidden, hand, loss, grad)
            assert isinstance(state, CellState)
            assert state.theta.requires_grad == graph
            assert_close(state.theta, torch.tensor(hand["theta"], dtype=F64), **tol)
            logits = torch.tensor(hand["logits"], dtype=F64).T
            assert_close(state.gate_logits, logits, **tol)
            assert_close(state.hidden, torch.tensor(hand["h"], dtype=F64).T, **tol)
            assert_close(state.cell, torch.tensor(hand["c"], dtype=F64).T, **tol)
            assert_close(gates, torch.tensor(hand["gates"], dtype=F64).T, **tol)


def reference_step(
    cell: MetaLearnerCell, state: CellState, loss: Tensor, grad: Tensor
) -> tuple[CellState, Tensor]:
    """The step in plain differentiable torch, straight from the equations (autograd reference)."""
    hidden = cell.hidden_size
    n = grad.shape[0]
    features = torch.cat(
        [preprocess(grad, cell.p).T, preprocess(loss.reshape(1), cell.p).T.expand(2, n)]
    )
    z = cell.lstm_weight @ torch.cat([features, state.hidden]) + cell.lstm_bias[:, None]
    i, f, o = (torch.sigmoid(z[k * hidden : (k + 1) * hidden]) for k in range(3))
    c = f * state.cell + i * torch.tanh(z[3 * hidden :])
    h = o * torch.tanh(c)
    w = cell.gate_weight
    logits = (
        w[:, :hidden] @ h
        + w[:, hidden : hidden + 1] * state.theta
        + w[:, hidden + 1 :] * state.gate_logits
        + cell.gate_bias[:, None]
    )
    gates = torch.sigmoid(logits)
    return CellState(gates[0] * state.theta - gates[1] * grad, logits, h, c), gates


@pytest.mark.parametrize("second_order", [False, True])
def test_cell_backward_matches_autograd_reference(second_order: bool) -> None:
    """Two steps, a loss touching every output; gradients w.r.t. the meta-parameters and (for
    the second-order case) the learner's loss and gradient inputs, vs the plain formulation."""
    g = torch.Generator().manual_seed(0)
    n, hidden = 7, 3
    cell = MetaLearnerCell(torch.randn(n, generator=g, dtype=F64), hidden_size=hidden).double()
    with torch.no_grad():
        for param in cell.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=F64))
    losses = [torch.tensor(v, dtype=F64, requires_grad=second_order) for v in (1.3, 0.2)]
    grads = [
        (
            torch.randn(n, generator=g, dtype=F64) * torch.logspace(-6, 0, n, dtype=F64)
        ).requires_grad_(second_order)
        for _ in range(2)
    ]
    weights = [torch.randn(s, generator=g, dtype=F64) for s in ((n,), (2, n), (hidden, n))]

    def total(step: Callable[..., tuple[CellState, Tensor]]) -> tuple[Tensor, ...]:
        state = cell.initial_state()
        out = torch.zeros((), dtype=F64)
        for loss, grad in zip(losses, grads):
            state, gates = step(cell, state, loss, grad)
            out = out + (weights[1] * gates).sum()
        out = out + (weights[0] * state.theta).sum() + (weights[1] * state.gate_logits).sum()
        out = out + (weights[2] * state.hidden).sum() + (weights[2] * state.cell).sum()
        inputs = [*cell.parameters(), *(losses + grads if second_order else [])]
        return torch.autograd.grad(out, inputs)

    fused = total(lambda c, s, loss, grad: c(s, loss, grad))
    reference = total(reference_step)
    for a, b in zip(fused, reference):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cell_feeds_back_previous_logits() -> None:
    """Only the last column of W_F / W_I changes → the second step's logits move by exactly
    (column) x (first step's logits), row by row: the forget row takes f_1, the input row i_1."""
    cell, _ = hand_cell(2)
    loss1, grad1 = torch.tensor(0.9, dtype=F64), torch.tensor([0.1, -0.3, 4e-6], dtype=F64)
    loss2, grad2 = torch.tensor(0.6, dtype=F64), torch.tensor([-0.2, 0.05, 1e-3], dtype=F64)

    def two_steps(feedback: tuple[float, float]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            cell.gate_weight[:, -1] = torch.tensor(feedback, dtype=F64)
            s1, _ = cell(cell.initial_state(), loss1, grad1)
            s2, _ = cell(s1, loss2, grad2)
        return s1.gate_logits, s2.gate_logits

    first, base = two_steps((0.0, 0.0))
    first_fb, with_fb = two_steps((0.5, -2.0))
    assert_close(first_fb, first, rtol=0, atol=0)  # logits start at 0
    assert first.abs().min() > 0.1  # the feedback is not trivially zero
    expected = base + torch.tensor([[0.5], [-2.0]], dtype=F64) * first
    assert_close(with_fb, expected, rtol=1e-12, atol=1e-12)


# -- 4, 5. meta-gradients vs finite differences in float64 --------------------------------------


@pytest.mark.parametrize("train_query_bn", ["batch", "support"])
def test_first_order_meta_gradient_matches_finite_differences(
    monkeypatch: pytest.MonkeyPatch, train_query_bn: str
) -> None:
    cfg = small_config(train_query_bn=train_query_bn)
    model = double_model(cfg)
    episode = random_episode(cfg, seed=1)
    assert model.learner.n_params == 318

    with recording(monkeypatch) as record:
        out = model.meta_loss(episode)
    assert len(record) == cfg.settings.inner_steps
    # what meta_loss back-propagates
    loss_grads = torch.autograd.grad(out.loss, list(model.parameters()))
    from_meta_loss = dict(zip(meta_params(model), loss_grads))
    # support mode: the support passes' running statistics are constants, like L_t and g_t
    support_bn = None
    if train_query_bn == "support":
        with torch.no_grad():
            support_bn = model.inner_loop(
                episode.support_x, episode.support_y, cfg.settings.inner_steps
            ).bn

    def objective() -> Tensor:
        return replayed_objective(model, record, episode, support_bn)

    assert float(objective().detach()) == pytest.approx(float(out.loss.detach()), rel=1e-12)
    grads = autograd_grads(model, objective)
    for name, g in grads.items():
        assert_close(from_meta_loss[name], g, rtol=1e-9, atol=1e-13)
        assert g.abs().max() > 1e-6, f"{name} receives no meta-gradient"
    check_against_fd(model, objective, grads, seed=2)


def test_second_order_meta_gradient_matches_finite_differences_of_full_objective() -> None:
    cfg = small_config(second_order=True)
    model = double_model(cfg)
    episode = random_episode(cfg, seed=3)

    def full_objective() -> Tensor:
        # every call re-runs the inner loop with the learner's true gradients at the current φ
        return model.meta_loss(episode).loss

    grads = autograd_grads(model, full_objective)
    check_against_fd(model, full_objective, grads, seed=4, coords=1, per_tensor_direction=False)

    # the option matters: the first-order gradient of the same φ and episode is different and
    # does not match the full objective's finite differences
    first = double_model(small_config(second_order=False))
    first.load_state_dict(model.state_dict())
    first_grads = autograd_grads(first, lambda: first.meta_loss(episode).loss)
    d = {"cell.theta0": torch.randn(grads["cell.theta0"].shape, dtype=torch.float64)}
    numeric = stable_difference(model, full_objective, d)
    exact = float((grads["cell.theta0"] * d["cell.theta0"]).sum())
    approx = float((first_grads["cell.theta0"] * d["cell.theta0"]).sum())
    assert exact == pytest.approx(numeric, rel=1e-5)
    assert abs(approx - numeric) > 1e-3 * abs(numeric)


def test_first_order_treats_loss_and_gradient_as_constants() -> None:
    model = build_method(small_config()).double()
    theta = model.cell.theta0 * 1.0
    episode = random_episode(small_config(), seed=5)
    bn = model.learner.fresh_batchnorm_state(dtype=torch.float64)
    loss, grad = ml.learner_loss_and_grad(
        model.learner, theta, episode.support_x, episode.support_y, bn, second_order=False
    )
    assert not loss.requires_grad and not grad.requires_grad
    bn = model.learner.fresh_batchnorm_state(dtype=torch.float64)
    loss2, grad2 = ml.learner_loss_and_grad(
        model.learner, theta, episode.support_x, episode.support_y, bn, second_order=True
    )
    assert loss2.requires_grad and grad2.requires_grad
    assert_close(grad2.detach(), grad, rtol=0, atol=0)
    # g is the true gradient of the support loss at θ (batch statistics)
    at = theta.detach().requires_grad_(True)
    logits = model.learner(at, episode.support_x, None, batch_stats=True)
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, episode.support_y), at)
    assert_close(grad, expected, rtol=1e-12, atol=1e-15)


# -- 6. batch norm: per-episode statistics ------------------------------------------------------


def test_support_passes_update_running_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """After T steps the episode's running statistics are the momentum average (from mean 0,
    variance 1) of the T support batches at θ_0 .. θ_{T-1}: what nn.BatchNorm2d would hold."""
    cfg = small_config(inner_steps=4, bn_momentum=0.7)
    model = double_model(cfg)
    episode = random_episode(cfg, seed=6)
    with recording(monkeypatch) as record, torch.no_grad():
        result = model.inner_loop(episode.support_x, episode.support_y, cfg.settings.inner_steps)
    assert len(record) == cfg.settings.inner_steps
    norms: list[nn.BatchNorm2d] = []
    for t, (theta, _, _) in enumerate(record):
        net = reference_net(model.learner, theta, cfg.bn_momentum, cfg.bn_eps).train()
        modules = [m for m in net if isinstance(m, nn.BatchNorm2d)]
        if t:  # carry the running statistics from the previous step's pass
            for new, old in zip(modules, norms):
                new.running_mean.copy_(old.running_mean)
                new.running_var.copy_(old.running_var)
        with torch.no_grad():
            net(episode.support_x)
        norms = modules
    for i, norm in enumerate(norms):
        mean = result.bn[f"blocks.{i}.norm.running_mean"]
        var = result.bn[f"blocks.{i}.norm.running_var"]
        assert mean.abs().max() > 1e-3 and (var - 1).abs().max() > 1e-3  # they did move
        assert_close(mean, norm.running_mean, rtol=1e-10, atol=1e-12)
        assert_close(var, norm.running_var, rtol=1e-10, atol=1e-12)
    # the module's own buffers are never touched: nothing leaks into the next episode
    for name, buffer in model.learner.net.named_buffers():
        if name.endswith("running_mean"):
            assert buffer.eq(0).all(), name
        elif name.endswith("running_var"):
            assert buffer.eq(1).all(), name


def test_batchnorm_statistics_reset_between_episodes() -> None:
    cfg = small_config()
    episode_a = random_episode(cfg, seed=10)
    episode_b = random_episode(cfg, seed=11)
    model = double_model(cfg)
    fresh = double_model(cfg)  # same φ, never saw episode A
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    model.meta_loss(episode_a).loss.backward()  # a meta-training episode on A
    model.zero_grad()
    model.predict(episode_a.support_x, episode_a.support_y, episode_a.query_x)  # evaluation on A
    after_a = model.predict(episode_b.support_x, episode_b.support_y, episode_b.query_x)
    alone = fresh.predict(episode_b.support_x, episode_b.support_y, episode_b.query_x)
    assert_close(after_a, alone, rtol=0, atol=0)
    classifier_a = model.adapt(episode_a.support_x, episode_a.support_y)
    classifier_b = model.adapt(episode_b.support_x, episode_b.support_y)
    for key, value in classifier_b.bn.items():  # type: ignore[attr-defined]
        assert not torch.equal(value, classifier_a.bn[key]), key  # type: ignore[attr-defined]


def test_query_protocol_non_transductive_and_transductive() -> None:
    cfg = small_config(q_query=4)
    episode = random_episode(cfg, seed=12)
    model = double_model(cfg)
    queries = episode.query_x

    classifier = model.adapt(episode.support_x, episode.support_y)
    bn_before = {k: v.clone() for k, v in classifier.bn.items()}  # type: ignore[attr-defined]
    all_logits = classifier(queries)
    one_by_one = torch.cat([classifier(queries[i : i + 1]) for i in range(len(queries))])
    reordered = classifier(queries.flip(0)).flip(0)
    subset = classifier(queries[:3])
    # non-transductive: an image's logits do not depend on the other query images ...
    assert_close(one_by_one, all_logits, rtol=1e-10, atol=1e-12)
    assert_close(reordered, all_logits, rtol=1e-10, atol=1e-12)
    assert_close(subset, all_logits[:3], rtol=1e-10, atol=1e-12)
    # ... because they use the support statistics, which classifying does not change
    for key, value in classifier.bn.items():  # type: ignore[attr-defined]
        assert torch.equal(value, bn_before[key]), key
    result = model.inner_loop(episode.support_x, episode.support_y, cfg.settings.eval_steps)
    expected = model.learner(result.theta.detach(), queries, result.bn, batch_stats=False)
    assert_close(all_logits, expected, rtol=1e-10, atol=1e-12)

    transductive = build_method(small_config(q_query=4, transductive=True)).double()
    transductive.load_state_dict(model.state_dict())
    t_classifier = transductive.adapt(episode.support_x, episode.support_y)
    t_all = t_classifier(queries)
    t_subset = t_classifier(queries[:3])
    # transductive: the query batch's own statistics, so the batch composition matters
    assert not torch.allclose(t_subset, t_all[:3], rtol=1e-6, atol=1e-6)
    bn = model.learner.fresh_batchnorm_state(dtype=torch.float64)
    assert_close(t_all, model.learner(result.theta.detach(), queries, bn, batch_stats=True))


@pytest.mark.parametrize("algorithm", ["lstm", "maml"])
@pytest.mark.parametrize("train_query_bn", ["batch", "support"])
@pytest.mark.parametrize("query_bn", ["support", "final"])
def test_meta_training_query_batch_norm(algorithm: str, train_query_bn: str, query_bn: str) -> None:
    """The query pass of meta-training uses its batch statistics (the authors') or, with
    train_query_bn=support, exactly what the non-transductive test classifier uses (with
    query_bn=final, the support pass at θ_T included)."""
    cfg = small_config(algorithm=algorithm, train_query_bn=train_query_bn, query_bn=query_bn)
    model = build_method(cfg).double()
    episode = random_episode(cfg, seed=13)
    loss = float(model.meta_loss(episode).loss.detach())
    classifier = model.adapt(episode.support_x, episode.support_y)
    running = classifier(episode.query_x)  # support statistics (non-transductive test)
    assert isinstance(classifier, ml.AdaptedLearner)
    with torch.no_grad():
        batch = model.learner(classifier.theta, episode.query_x, None, batch_stats=True)
    losses = {
        "batch": float(F.cross_entropy(batch, episode.query_y)),
        "support": float(F.cross_entropy(running, episode.query_y)),
    }
    other = "support" if train_query_bn == "batch" else "batch"
    assert loss == pytest.approx(losses[train_query_bn], rel=1e-12)
    assert loss != pytest.approx(losses[other], rel=1e-6)


def test_train_query_bn_rejects_unknown_modes() -> None:
    with pytest.raises(ConfigError, match="train_query_bn='query'"):
        small_config(train_query_bn="query")


def test_adapt_runs_test_steps_without_meta_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_config(inner_steps=3, eval_inner_steps=5)
    model = double_model(cfg)
    episode = random_episode(cfg, seed=14)
    with recording(monkeypatch) as record:
        classifier = model.adapt(episode.support_x, episode.support_y)
    assert len(record) == 5
    assert not classifier.theta.requires_grad  # type: ignore[attr-defined]
    with recording(monkeypatch) as record:
        model.meta_loss(episode)
    assert len(record) == 3
