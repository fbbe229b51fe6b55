"""The fast paths compute the same mathematics as the plain formulation.

Speed work (issue 6) made the meta-learner step one autograd node with a hand-written backward
(optionally torch.compile'd), folded the loss features into layer 1's bias, and ran the learner
channels-last with ReLU after the max-pool. Every test here compares such a path with a
straightforward reference kept in this file (the conv-4 learner in NCHW with ReLU before the
pool, the LSTM written op by op, both under autograd) in float64 at tight tolerance: the
meta-gradient of whole episodes (first and second order), evaluation logits, the compiled step.
Plus: the benchmark runs and reports its figures, and the CUDA path where CUDA exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from conftest import small_config
from metalstm import Config, MetaLSTM, build_method, layers, override
from metalstm import native as metalstm_native
from metalstm.bench import add_bench_arguments, bench_config, bench_main, episode_flops
from metalstm.data import Episode, Episodes
from metalstm.inner_loop import SGD, run_inner_loop
from metalstm.learner import BatchNormState, Learner, LearnerShape, to_channels_last
from metalstm.methods.metalearner import CellState, MetaLearnerCell, native, preprocess
from metalstm.methods.metalearner import kernels as ml
from metalstm.methods.metalearner.cell import ChainedState

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the reference: the plain formulation, autograd over every operation -------------------------


def reference_learner(
    learner: Learner, theta: Tensor, x: Tensor, bn: BatchNormState, batch_stats: bool
) -> Tensor:
    """The conv-4 learner as the paper draws it: NCHW, conv → BN → ReLU → max-pool, at θ."""
    p = learner.unflatten(theta)
    for k, block in enumerate(learner.net.blocks):
        norm = block.norm
        assert isinstance(norm, torch.nn.BatchNorm2d) and norm.momentum is not None
        x = F.conv2d(x, p[f"blocks.{k}.conv.weight"], p[f"blocks.{k}.conv.bias"], padding=1)
        x = F.batch_norm(
            x,
            bn[f"blocks.{k}.norm.running_mean"],
            bn[f"blocks.{k}.norm.running_var"],
            p[f"blocks.{k}.norm.weight"],
            p[f"blocks.{k}.norm.bias"],
            training=batch_stats,
            momentum=norm.momentum,
            eps=norm.eps,
        )
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])


def reference_cell(
    cell: MetaLearnerCell, state: CellState, loss: Tensor, grad: Tensor
) -> tuple[CellState, Tensor]:
    """Both layers as written in the paper, features [4, n] broadcast, one autograd op each."""
    n, hidden = grad.shape[0], cell.hidden_size
    features = torch.cat(
        [preprocess(grad, cell.p).T, preprocess(loss.reshape(1), cell.p).T.expand(2, n)]
    )  # [4, n]
    z = cell.lstm_bias.unsqueeze(1) + cell.lstm_weight @ torch.cat([features, state.hidden])
    i, f, o = (torch.sigmoid(z[k * hidden : (k + 1) * hidden]) for k in range(3))
    c = f * state.cell + i * torch.tanh(z[3 * hidden :])
    h = o * torch.tanh(c)
    w = cell.gate_weight
    logits = (
        w[:, :hidden] @ h
        + w[:, hidden : hidden + 1] * state.theta
        + w[:, hidden + 1 :] * state.gate_logits
        + cell.gate_bias.unsqueeze(1)
    )
    gates = torch.sigmoid(logits)
    return CellState(gates[0] * state.theta - gates[1] * grad, logits, h, c), gates


def reference_inner_loop(
    model: MetaLSTM, x: Tensor, y: Tensor, steps: int, second_order: bool
) -> tuple[Tensor, BatchNormState]:
    learner, cell, cfg = model.learner, model.cell, model.config
    bn = learner.fresh_batchnorm_state(x.device, x.dtype)
    state = cell.initial_state()
    scale = 1.0 / x.shape[0] if cfg.settings.grad_divide_batch else 1.0
    for _ in range(steps):
        at = state.theta if second_order else state.theta.detach().requires_grad_(True)
        loss = F.cross_entropy(reference_learner(learner, at, x, bn, True), y)
        (grad,) = torch.autograd.grad(loss, at, create_graph=second_order)
        if not second_order:
            loss = loss.detach()
        state, _ = reference_cell(cell, state, loss, grad * scale)
    return state.theta, bn


def reference_meta_loss(model: MetaLSTM, episode: Episode) -> Tensor:
    theta, bn = reference_inner_loop(
        model,
        episode.support_x,
        episode.support_y,
        model.settings.inner_steps,
        model.settings.second_order,
    )
    logits = reference_learner(model.learner, theta, episode.query_x, bn, True)
    return F.cross_entropy(logits, episode.query_y)


def reference_predict(model: MetaLSTM, episode: Episode) -> Tensor:
    theta, bn = reference_inner_loop(
        model, episode.support_x, episode.support_y, model.settings.eval_steps, False
    )
    with torch.no_grad():
        return reference_learner(
            model.learner, theta.detach(), episode.query_x, bn, model.config.transductive
        )


# -- helpers -----------------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # the scripts the tests run


def config(**changes: Any) -> Config:
    return small_config(**{"filters": 4, **changes})


def episode(cfg: Config, seed: int = 0, dtype: torch.dtype = F64) -> Episode:
    g = torch.Generator().manual_seed(seed)
    n, k, q, s, ch = cfg.n_way, cfg.k_shot, cfg.q_query, cfg.image_size, cfg.channels
    support_y = torch.arange(n).repeat_interleave(k)
    query_y = torch.arange(n).repeat_interleave(q)
    return Episode(
        torch.rand(n * k, ch, s, s, generator=g, dtype=dtype),
        support_y,
        torch.rand(n * q, ch, s, s, generator=g, dtype=dtype),
        query_y,
        torch.arange(n),
        support_y,
        query_y,
    )


def perturbed_model(cfg: Config, seed: int = 1) -> MetaLSTM:
    """A float64 model whose meta-parameters are far from the initialisation (every path busy)."""
    model = build_method(cfg).double()
    assert isinstance(model, MetaLSTM)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "cell.theta0":
                param.add_(0.3 * torch.randn(param.shape, generator=g, dtype=F64))
    return model


def grads(model: torch.nn.Module, loss: Tensor) -> dict[str, Tensor]:
    names = [name for name, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


def assert_close(actual: Tensor, expected: Tensor, rtol: float, atol: float = 0.0) -> None:
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert diff <= atol + rtol * scale, f"max abs diff {diff:.3e} (max |expected| {scale:.3e})"


# -- the meta-gradient of whole episodes ---------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"channels": 3, "image_size": 20},
        {"grad_divide_batch": True, "k_shot": 1},
        {"second_order": True, "inner_steps": 2},
        {"hidden_size": 5, "preprocess_p": 6.0},
    ],
    ids=["first-order", "rgb", "grad-divide-batch", "second-order", "other-sizes"],
)
def test_meta_gradient_matches_plain_reference(changes: dict[str, Any]) -> None:
    cfg = config(**changes)
    model = perturbed_model(cfg)
    ep = episode(cfg)
    fast = model.meta_loss(ep).loss
    slow = reference_meta_loss(model, ep)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-12)
    fast_grads, slow_grads = grads(model, fast), grads(model, slow)
    for name in fast_grads:
        assert_close(fast_grads[name], slow_grads[name], rtol=1e-10, atol=1e-14)


def test_float32_meta_gradient_close_to_float64_reference() -> None:
    """The float32 fast path stays within float32 rounding of the exact (float64) answer."""
    cfg = config(inner_steps=4)
    model64 = perturbed_model(cfg)
    model32 = perturbed_model(cfg).float()
    ep32 = episode(cfg, dtype=torch.float32)
    ep64 = replace(ep32, support_x=ep32.support_x.double(), query_x=ep32.query_x.double())
    exact = grads(model64, reference_meta_loss(model64, ep64))
    fast = grads(model32, model32.meta_loss(ep32).loss)
    for name in exact:
        assert_close(fast[name].double(), exact[name], rtol=1e-3)


@pytest.mark.parametrize("transductive", [False, True])
def test_evaluation_logits_match_plain_reference(transductive: bool) -> None:
    cfg = config(transductive=transductive, eval_inner_steps=4)
    model = perturbed_model(cfg)
    model.eval()
    ep = episode(cfg, seed=3)
    fast = model.predict(ep.support_x, ep.support_y, ep.query_x)
    assert_close(fast, reference_predict(model, ep), rtol=1e-11)


@pytest.mark.parametrize("method", ["lstm", "maml"])
@pytest.mark.parametrize("episodes", [1, 2])
def test_evaluation_shares_the_prototype_heads_forward_with_the_first_step(
    method: str, episodes: int
) -> None:
    """At evaluation with the prototype head, θ_0's head and the first support pass come from
    one forward of the body (inner_loop.prototype_start): θ_T and the statistics have the bits of
    the head's own pass followed by the first step, for one episode and a batch of two."""
    cfg = config(method=method, filters=8, head_init="prototypes", episode_batch=episodes)
    model = build_method(cfg)
    eps = [episode(cfg, seed=seed, dtype=torch.float32) for seed in range(episodes)]
    x, y = eps[0].support_x, eps[0].support_y
    if episodes > 1:
        x, y = torch.stack([e.support_x for e in eps]), torch.stack([e.support_y for e in eps])
    theta0 = model.theta0.detach()
    rule = model.cell if isinstance(model, MetaLSTM) else SGD(model.settings.inner_lr)
    with torch.no_grad():
        shared = model.inner_loop(x, y, 3)
        plain = run_inner_loop(model.learner, rule, model.episode_theta0(theta0, x, y), x, y, 3)
        assert model.episode_start(theta0, x, y)[1]  # the shared start is what ran
    assert torch.equal(shared.theta, plain.theta)
    assert shared.support_losses == plain.support_losses
    for name in plain.bn:
        assert torch.equal(shared.bn[name], plain.bn[name])


def test_evaluation_keeps_no_meta_graph() -> None:
    cfg = config()
    model = perturbed_model(cfg)
    ep = episode(cfg)
    with torch.no_grad():
        result = model.inner_loop(ep.support_x, ep.support_y, 2, record_gates=True)
    assert not result.theta.requires_grad and result.theta.grad_fn is None
    assert all(g.grad_fn is None for g in result.infos)
    assert len(result.support_losses) == 2 and all(
        isinstance(v, float) for v in result.support_losses
    )


def test_recorded_gates_match_the_reference_cell() -> None:
    cfg = config()
    model = perturbed_model(cfg)
    ep = episode(cfg)
    with torch.no_grad():
        fast = model.inner_loop(ep.support_x, ep.support_y, 3, record_gates=True).infos
    state, bn, expected = (
        model.cell.initial_state(),
        model.learner.fresh_batchnorm_state(dtype=F64),
        [],
    )
    for _ in range(3):
        at = state.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(
                reference_learner(model.learner, at, ep.support_x, bn, True), ep.support_y
            )
            (grad,) = torch.autograd.grad(loss, at)
        with torch.no_grad():
            state, gates = reference_cell(model.cell, state, loss.detach(), grad)
        expected.append(gates)
    for a, b in zip(fast, expected):
        assert_close(a, b, rtol=1e-11)


def test_denormal_flushing_is_scoped_to_the_meta_learner() -> None:
    """FTZ/DAZ is on inside the step kernels only: a training step and an evaluation leave the
    thread's floating-point mode as they found it (other code, e.g. hypothesis, depends on it)."""
    assert not ml._denormals_flushed()
    cfg = config()
    model = perturbed_model(cfg)
    ep = episode(cfg)
    seen = []
    original = ml.step_forward

    def spy(*args: Any) -> Any:
        seen.append(ml._denormals_flushed())
        return original(*args)

    kernels = ml.StepKernels("spy", spy, ml.step_backward)
    model.cell._kernels = lambda: kernels  # type: ignore[method-assign]
    model.meta_loss(ep).loss.backward()
    model.predict(ep.support_x, ep.support_y, ep.query_x)
    assert seen and all(seen)
    assert not ml._denormals_flushed()


# -- the learner --------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size,batch", [(1, 28, 5), (3, 32, 4)])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_learner_fast_forward_matches_module(
    channels: int, size: int, batch: int, batch_stats: bool
) -> None:
    """Channels-last, ReLU after pool: logits, θ-gradient and running statistics equal the
    plain NCHW formulation's (ReLU then pool)."""
    learner = Learner(LearnerShape(channels, size, 5, 6), bn_momentum=0.7)
    g = torch.Generator().manual_seed(0)
    theta = (
        learner.initial_theta().double()
        + 0.05 * torch.randn(learner.n_params, generator=g, dtype=F64)
    ).requires_grad_(True)
    x = torch.rand(batch, channels, size, size, generator=g, dtype=F64) - 0.3
    y = torch.arange(batch) % 5
    bn_fast = learner.fresh_batchnorm_state(dtype=F64)
    bn_slow = learner.fresh_batchnorm_state(dtype=F64)
    if not batch_stats:  # non-trivial running statistics to normalise with
        for state in (bn_fast, bn_slow):
            reference_learner(learner, theta.detach(), x * 1.7, state, True)
    fast = learner(theta, x, bn_fast, batch_stats=batch_stats)
    slow = reference_learner(learner, theta, x, bn_slow, batch_stats)
    assert_close(fast, slow, rtol=1e-12)
    (g_fast,) = torch.autograd.grad(F.cross_entropy(fast, y), theta)
    (g_slow,) = torch.autograd.grad(F.cross_entropy(slow, y), theta)
    assert_close(g_fast, g_slow, rtol=1e-11)
    for key in bn_fast:
        assert_close(bn_fast[key], bn_slow[key], rtol=1e-12)
    features = learner.features(
        theta, x, learner.fresh_batchnorm_state(dtype=F64), batch_stats=True
    )
    assert features.shape == (batch, 6 * (size // 16) ** 2)


def test_single_channel_images_get_channels_last_strides() -> None:
    x = to_channels_last(torch.rand(5, 1, 28, 28))
    assert x.stride() == (784, 1, 28, 1)
    weight = torch.randn(8, 1, 3, 3)
    assert F.conv2d(x, weight, padding=1).is_contiguous(memory_format=torch.channels_last)


# -- torch.compile: same results, and a clean fallback -------------------------------------------


def test_compile_falls_back_to_eager_when_compilation_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_compile(fn: Any, **kwargs: Any) -> Any:
        def fail(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(ml, "_compiled", {})
    cfg = config()
    eager, compiled = perturbed_model(cfg), perturbed_model(cfg)
    compiled.cell.use_compile = True
    ep = episode(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = compiled.meta_loss(ep).loss
        compiled_grads = grads(compiled, loss)
    assert any("running it eagerly" in str(w.message) for w in caught)
    eager_grads = grads(eager, eager.meta_loss(ep).loss)
    for name in eager_grads:
        assert torch.equal(compiled_grads[name], eager_grads[name])


def test_config_compile_reaches_the_cell() -> None:
    assert build_method(config(compile=True)).cell.use_compile  # type: ignore[union-attr]
    assert not build_method(config()).cell.use_compile  # type: ignore[union-attr]


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    """The real torch.compile (inductor; needs a C++ compiler on the CPU): same meta-gradient."""
    cfg = config(inner_steps=2)
    eager, compiled = perturbed_model(cfg), perturbed_model(cfg)
    compiled.cell.use_compile = True
    ep = episode(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled_grads = grads(compiled, compiled.meta_loss(ep).loss)
    eager_grads = grads(eager, eager.meta_loss(ep).loss)
    for name in eager_grads:
        assert_close(compiled_grads[name], eager_grads[name], rtol=1e-10, atol=1e-14)


# -- the native step kernels: same mathematics, any thread count, a clean fallback -----------------

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable here: {native.status()}"
)


def step_inputs(n: int, hidden: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Inputs of one inner step with every path busy (state and weights far from zero)."""
    g = torch.Generator().manual_seed(n + hidden)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=dtype)

    return [
        rand(2, n),
        rand(hidden, n, scale=0.5),
        rand(hidden, n, scale=0.5),
        rand(n, scale=0.1),
        rand(2, n),
        rand(n, scale=0.01),
        rand(4 * hidden, 2 + hidden, scale=0.3),
        rand(4 * hidden, scale=0.3),
        rand(2, hidden + 2, scale=0.3),
        torch.tensor([4.5, -4.5], dtype=dtype),
    ]


def saved_for_backward(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """What CellStep saves: what a kernel set's forward returns after the step's five outputs
    (each set keeps what its own backward needs)."""
    return outputs[5:]


@needs_native
@pytest.mark.parametrize(("n", "hidden"), [(5, 20), (37, 20), (1300, 20), (700, 5)])
def test_native_step_matches_eager(n: int, hidden: int) -> None:
    """Forward and backward, with every combination of incoming gradients and wanted outputs,
    for sizes below one vector, across vectors and across blocks (512 coordinates)."""
    inputs = step_inputs(n, hidden)
    eager, fused = ml.step_forward(hidden, *inputs), native.step_forward(hidden, *inputs)
    for a, b in zip(fused[:5], eager[:5]):
        assert_close(a, b, rtol=2e-6)

    # What each forward writes for its backward beyond the step's inputs and outputs: the
    # native one nothing (its backward computes x, the activations and tanh c_t again).
    def written(outputs: tuple[Tensor, ...]) -> int:
        held = {t.data_ptr() for t in (*inputs, *outputs[:5])}
        return sum(t.numel() for t in saved_for_backward(outputs) if t.data_ptr() not in held)

    assert written(eager) == (2 + hidden + 4 * hidden + hidden) * n  # x, acts, tanh c_t
    assert written(fused) == 0
    inference = native.step_forward(hidden, *inputs, keep=False)
    assert len(inference) == 5
    for a, b in zip(inference, fused):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    incoming = [
        torch.randn(shape, generator=g)
        for shape in ((n,), (2, n), (hidden, n), (hidden, n), (2, n))
    ]
    for need in [(True, True), (False, True), (True, False), (False, False)]:
        for dropped in [(), (1, 2, 3, 4), (4,)]:
            d = [None if i in dropped else t for i, t in enumerate(incoming)]
            want = ml.step_backward(hidden, saved_for_backward(eager), *d, need)
            got = native.step_backward(hidden, saved_for_backward(fused), *d, need)
            for a, b in zip(got, want):
                assert (a is None) == (b is None)
                if a is not None and b is not None:
                    assert_close(a, b, rtol=5e-5)


@needs_native
def test_the_last_step_at_evaluation_writes_only_theta_and_the_gates() -> None:
    """The inner loop's last step without a meta-graph leaves h_T, c_T and the logits unwritten
    (zero-size): θ_T and the gates have the bits of a full step, and that state takes no more."""
    n, hidden = 1300, 20
    inputs = step_inputs(n, hidden)
    full = native.step_forward(hidden, *inputs, keep=False)
    last = native.step_forward(hidden, *inputs, keep=False, last=True)
    assert torch.equal(last[0], full[0]) and torch.equal(last[4], full[4])
    assert [t.numel() for t in last[1:4]] == [0, 0, 0]
    cell = MetaLearnerCell(inputs[3], hidden)
    grad = inputs[5]
    with torch.no_grad():
        first, _ = cell.update(cell.initial_state(), torch.tensor(0.5), grad)
        final, gates = cell.update(first, torch.tensor(0.4), 0.5 * grad, last=True)
        other, other_gates = cell.update(first, torch.tensor(0.4), 0.5 * grad)
        assert torch.equal(final.theta, other.theta) and torch.equal(gates, other_gates)
        with pytest.raises(ValueError, match="last step"):
            cell.update(final, torch.tensor(0.3), grad)


@needs_native
def test_native_step_writes_large_outputs_with_the_same_bits() -> None:
    """A step whose outputs exceed the native source's STREAM_BYTES (32 MB: here 45 rows of
    200,003 coordinates) writes them with streaming stores, at row starts that are not 64-byte
    aligned: every coordinate gets the bits a small step over its own slice gives."""
    n, hidden = 200_003, 20
    inputs = step_inputs(n, hidden)
    assert (2 + 2 * hidden + 3) * n * 4 > 32 << 20
    large = native.step_forward(hidden, *inputs, keep=False)
    for start, stop in [(0, 1300), (99_990, 101_037), (n - 700, n)]:
        part = [t[..., start:stop] if t.shape[-1] == n else t for t in inputs]
        small = native.step_forward(hidden, *part, keep=False)
        for a, b in zip(large, small):
            assert torch.equal(a[..., start:stop], b)


@needs_native
def test_native_step_is_the_same_for_any_thread_count() -> None:
    """The sums over coordinates are taken in fixed blocks added in order: bit for bit."""
    n, hidden = 3000, 20
    inputs = step_inputs(n, hidden)
    incoming = [torch.ones(n), torch.ones(2, n), torch.ones(hidden, n), torch.ones(hidden, n), None]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = native.step_forward(hidden, *inputs)
        back = native.step_backward(hidden, saved_for_backward(out), *incoming, (True, True))
        results.append([*out, *back])
    torch.set_num_threads(1)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("n", [37, 1300])
def test_native_step_skips_the_zero_state_with_the_same_numbers(n: int) -> None:
    """At t = 1 the cell's h and c are zero_state (one expanded zero): the native step reads
    neither and skips their products with W, giving the bits stored zeros give, forward and
    backward; an expanded non-zero is not taken for zeros."""
    hidden = 20
    inputs = step_inputs(n, hidden)
    state = MetaLearnerCell(inputs[3], hidden).initial_state()
    assert ml.is_zero_state(state.hidden) and ml.is_zero_state(state.cell)
    with pytest.raises(RuntimeError):
        state.hidden.add_(1.0)  # no memory of its own to write into
    incoming = [torch.ones(n), torch.ones(2, n), torch.ones(hidden, n), torch.ones(hidden, n), None]
    for value in (0.0, 0.75):
        expanded, stored = list(inputs), list(inputs)
        for k in (1, 2):
            expanded[k] = torch.full((1, 1), value).expand(hidden, n)
            stored[k] = torch.full((hidden, n), value)
        assert ml.is_zero_state(expanded[1]) == (value == 0.0) and not ml.is_zero_state(stored[1])
        a = native.step_forward(hidden, *expanded)
        b = native.step_forward(hidden, *stored)
        back_a = native.step_backward(hidden, saved_for_backward(a), *incoming, (True, True))
        back_b = native.step_backward(hidden, saved_for_backward(b), *incoming, (True, True))
        for x, y in zip([*a[:5], *back_a], [*b[:5], *back_b]):
            assert (x is None and y is None) or torch.equal(x, y)


@needs_native
@pytest.mark.parametrize("n", [1, 15, 17, 70_001])
def test_native_preprocessing_matches_eager(n: int) -> None:
    """The meta-learner's input preprocessing in one native pass: within 2 ulp of the eager
    function where both are finite (log computed natively), the same bits for ±0, ±∞, NaN,
    subnormals and either side of the threshold e^-p, for p = 10 and 5, under and over a
    vector and on the threaded path (n ≥ 65,536), on any number of threads."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-12, 12, (n,), generator=g)
    special = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-40, -3e-42, 1.0, -1.0, 3e38]
    for p in (10.0, 5.0):
        edge = float(torch.tensor(math.exp(-p)))
        values = torch.tensor([*special, edge, -edge, math.nextafter(edge, 0.0)])
        x[: min(n, len(values))] = values[: min(n, len(values))]
        want = ml.preprocess_rows(x, p)
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(native.preprocess_rows(x, p))
        torch.set_num_threads(1)
        got = runs[0]
        bits = [run.view(torch.int32) for run in runs]
        assert all(torch.equal(bits[0], other) for other in bits[1:])
        finite = want.isfinite()
        assert torch.equal(got[~finite].isnan(), want[~finite].isnan())
        assert torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num())
        assert torch.equal(got[1].nan_to_num(), want[1].nan_to_num())  # no logarithm in it
        error = (got[0] - want[0])[finite[0]].abs()
        assert (error <= 2 * torch.finfo(torch.float32).eps * want[0][finite[0]].abs()).all()
    double = x.double()  # not native: the eager function's bits
    same = native.preprocess_rows(double, 10.0).view(torch.int64)
    assert torch.equal(same, ml.preprocess_rows(double, 10.0).view(torch.int64))


SHARED = (6, 8, 9)  # W, W2, b2 among a step's inputs: the same for every episode


def episodes_of(inputs: list[Tensor], count: int) -> list[Tensor]:
    """``count`` episodes' step inputs stacked [E, ...]: each episode's per-coordinate tensors and
    layer-1 bias scaled differently; the weights shared."""
    return [
        t if k in SHARED else torch.stack([t * (1.0 + 0.25 * e) for e in range(count)])
        for k, t in enumerate(inputs)
    ]


def episode_of(inputs: list[Tensor], e: int) -> list[Tensor]:
    """Episode e's step inputs out of :func:`episodes_of`'s."""
    return [t if k in SHARED else t[e] for k, t in enumerate(inputs)]


@needs_native
@pytest.mark.parametrize("n", [37, 1300])
def test_native_step_of_several_episodes_is_each_episodes_step(n: int) -> None:
    """E episodes in one call of the native step: every output, at meta-training, at evaluation
    and at the last step, from the zero state and from a state, has the bits of the episode's
    own call; so do the chain backward's ∂θ_0 and ∂b of each episode, and its gradients of the
    shared weights are the episodes' added in episode order. The preprocessing of [E, n] too."""
    hidden, count = 20, 3
    batched = episodes_of(step_inputs(n, hidden), count)
    zero = ml.zero_state(batched[3], hidden)  # the initial state's h and c
    for inputs in (batched, [batched[0], zero, zero, *batched[3:]]):
        for options in ({}, {"keep": False}, {"keep": False, "last": True}):
            together = native.step_forward(hidden, *inputs, **options)[:5]
            for e in range(count):
                alone = native.step_forward(hidden, *episode_of(inputs, e), **options)[:5]
                for a, b in zip(together, alone):
                    assert torch.equal(a[e], b)
    steps, steps_each, state = [], [[] for _ in range(count)], batched
    for _ in range(3):  # a chain of three steps, batched and per episode
        out = native.step_forward(hidden, *state)
        steps.append(tuple(out[5:]))
        for e in range(count):
            steps_each[e].append(tuple(native.step_forward(hidden, *episode_of(state, e))[5:]))
        state = [state[0], out[2], out[3], out[0], out[1], *state[5:]]
    d_theta = torch.randn(count, n, generator=torch.Generator().manual_seed(3))
    together = native.chain_backward(hidden, tuple(steps), d_theta)
    each = [native.chain_backward(hidden, tuple(steps_each[e]), d_theta[e]) for e in range(count)]
    for e in range(count):
        assert torch.equal(together[0][e], each[e][0])  # ∂θ_0
        assert torch.equal(together[2][:, e], each[e][2])  # ∂b, per step
    for k in (1, 3, 4):  # ∂W, ∂W2, ∂b2
        assert torch.equal(together[k], (each[0][k] + each[1][k]) + each[2][k])
    grads_ = batched[5] * 10.0 ** torch.arange(-6, -3).reshape(count, 1)
    rows = native.preprocess_rows(grads_)
    assert rows.shape == (count, 2, n)
    for e in range(count):
        assert torch.equal(rows[e], native.preprocess_rows(grads_[e]))


@needs_native
@pytest.mark.parametrize("second_order", [False, True])
def test_the_cell_steps_a_batch_of_episodes_as_each_episode(
    second_order: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cell as an update rule on E episodes (θ [E, n]): native, first-order and at
    evaluation, one call per step, each episode's θ_T and gates with the bits of its own inner
    loop and the meta-gradient the episodes' within float32 rounding; second-order (and with
    kernels that take one episode) each episode steps alone, with the same bits."""
    cfg = config(filters=8, inner_steps=3, second_order=second_order)
    model = perturbed_model(cfg).float()
    cell, steps = model.cell, cfg.settings.inner_steps
    count, n = 3, cell.theta0.shape[0]
    g = torch.Generator().manual_seed(5)
    theta0 = torch.stack([cell.theta0 * (1.0 + 0.1 * e) for e in range(count)])
    losses = torch.rand(steps, count, generator=g) + 0.5
    grads_ = 1e-3 * torch.randn(steps, count, n, generator=g)
    if second_order:
        grads_.requires_grad_(True)
    library, calls = native.library(), []

    class Counting:  # the step library, counting its forward calls
        def __getattr__(self, name: str) -> Any:
            if name == "metalstm_step_forward":
                calls.append(1)
            return getattr(library, name)

    monkeypatch.setattr(native, "library", Counting)

    def inner_loop(theta: Tensor, loss: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        state = cell.init(theta)
        gates = []
        for t in range(steps):
            state, info = cell.update(state, loss[t], grad[t], last=t == steps - 1)
            gates.append(info)
        return state.theta, torch.stack(gates)

    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            calls.clear()
            theta_all, gates_all = inner_loop(theta0, losses, grads_)
            one_call = not second_order or not grad_enabled
            assert len(calls) == (steps if one_call else count * steps)
            alone = [inner_loop(theta0[e], losses[:, e], grads_[:, e]) for e in range(count)]
        for e in range(count):
            assert torch.equal(theta_all[e], alone[e][0])
            assert torch.equal(gates_all[:, e], alone[e][1])
        if grad_enabled:
            weights = list(cell.parameters())
            together = torch.autograd.grad(
                theta_all.square().sum(), weights, allow_unused=True, retain_graph=True
            )
            each = torch.autograd.grad(
                sum(theta.square().sum() for theta, _ in alone), weights, allow_unused=True
            )
            for a, b in zip(together, each):
                if b is not None:
                    assert_close(a, b, rtol=1e-5)


@needs_native
def test_native_kernels_run_float32_cpu_and_leave_float64_to_eager() -> None:
    inputs = step_inputs(40, 20, dtype=F64)
    for a, b in zip(native.step_forward(20, *inputs), ml.step_forward(20, *inputs)):
        assert torch.equal(a, b)
    assert native.default_kernels() is native.NATIVE_KERNELS
    assert build_method(config()).cell._kernels().name == "native"  # type: ignore[operator, union-attr]
    assert native.step_kernels(False, torch.device("cpu"), torch.float32).startswith("native")
    assert native.step_kernels(False, torch.device("cpu"), F64) == "eager"
    assert native.step_kernels(True, torch.device("cpu"), torch.float32) == "torch.compile"


@needs_native
def test_native_meta_gradient_matches_eager_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole float32 episode (second order, several steps) through both kernels."""
    cfg = config(inner_steps=3, second_order=True, filters=8)
    model = perturbed_model(cfg).float()
    ep = episode(cfg, dtype=torch.float32)
    fused = grads(model, model.meta_loss(ep).loss)
    monkeypatch.setattr(native, "default_kernels", lambda: ml.EAGER_KERNELS)
    assert model.cell._kernels() is ml.EAGER_KERNELS
    eager = grads(model, model.meta_loss(ep).loss)
    for name in eager:
        assert not torch.equal(fused[name], eager[name])  # two computations, not one twice
        assert_close(fused[name], eager[name], rtol=1e-4)


def counting_chain(calls: list[int]) -> ml.StepKernels:
    """The native kernels, recording the number of steps of every chain backward they run."""

    def chain(hidden: int, steps: tuple[tuple[Tensor, ...], ...], d_theta: Tensor) -> Any:
        calls.append(len(steps))
        return native.chain_backward(hidden, steps, d_theta)

    return replace(native.NATIVE_KERNELS, chain=chain)


@needs_native
@pytest.mark.parametrize(
    "changes", [{"inner_steps": 1}, {"inner_steps": 5, "head_init": "prototypes"}]
)
def test_first_order_steps_are_one_backward_with_the_same_bits(
    changes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """First-order, θ_T's T native steps are one autograd node whose backward keeps the
    gradients passed between steps in cache: every meta-gradient has the bits of T nodes, one
    per step, on 1, 2 and 3 threads (θ_0 through the prototype head included)."""
    cfg = config(filters=8, **changes)
    model = perturbed_model(cfg).float()
    ep = episode(cfg, dtype=torch.float32)
    calls: list[int] = []
    chained, per_step = counting_chain(calls), replace(native.NATIVE_KERNELS, chain=None)
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        monkeypatch.setattr(native, "default_kernels", lambda: chained)
        one = grads(model, model.meta_loss(ep).loss)
        monkeypatch.setattr(native, "default_kernels", lambda: per_step)
        each = grads(model, model.meta_loss(ep).loss)
        for name in one:
            assert torch.equal(one[name], each[name]), name
    torch.set_num_threads(1)
    assert calls == [cfg.settings.inner_steps] * 3


@needs_native
def test_second_order_steps_are_not_chained(monkeypatch: pytest.MonkeyPatch) -> None:
    """With g_t differentiated each step stays its own node (no chain backward runs), and a
    chain of first-order steps refuses to go on with a second-order one."""
    cfg = config(filters=8, inner_steps=2, second_order=True)
    model = perturbed_model(cfg).float()
    calls: list[int] = []
    monkeypatch.setattr(native, "default_kernels", lambda: counting_chain(calls))
    model.meta_loss(episode(cfg, dtype=torch.float32)).loss.backward()
    assert calls == []
    cell = model.cell
    n = cell.theta0.shape[0]
    state, _ = cell.update(cell.initial_state(), torch.tensor(0.5), torch.randn(n))
    assert isinstance(state, ChainedState) and len(state.chain.steps) == 1
    with pytest.raises(RuntimeError, match="second-order"):
        cell.update(state, torch.tensor(0.5), torch.randn(n, requires_grad=True))


@pytest.mark.parametrize(
    ("env", "reason"),
    [({"METALSTM_NATIVE": "0"}, "METALSTM_NATIVE=0"), ({"CXX": "false"}, "false failed")],
)
def test_native_kernels_fall_back_to_eager_with_the_reason(
    env: dict[str, str], reason: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Turned off, or no working compiler (here a 'compiler' that fails): eager kernels for the
    step and the block, the reason in ``status`` and ``block_kernels`` (what ``metalstm bench``
    prints), once per process, no exception."""
    monkeypatch.setenv("METALSTM_CACHE", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    metalstm_native.load.cache_clear()
    try:
        assert not native.available()
        assert native.status().startswith("eager") and reason in native.status()
        assert native.default_kernels() is ml.EAGER_KERNELS
        assert layers.block_kernels().startswith("eager") and reason in layers.block_kernels()
        assert layers.conv_kernels().startswith("eager") and reason in layers.conv_kernels()
        assert not list(tmp_path.iterdir())
    finally:
        metalstm_native.load.cache_clear()


# -- the native convolution weight gradient ----------------------------------------------------

needs_native_conv = pytest.mark.skipif(
    not metalstm_native.available(layers.CONV_SOURCE),
    reason=f"native convolution kernel unavailable here: {layers.conv_kernels()}",
)

# (images, C_in, side, C_out, stride, groups): Omniglot's and RGB first layers, the deeper
# layers, stride 2, episodes as groups, sides of 1 and 2, odd sides, 16 / 32 / 64 filters
CONV_SHAPES = [
    (5, 1, 28, 64, 1, 1),
    (3, 3, 30, 32, 1, 1),
    (4, 32, 11, 32, 1, 1),
    (2, 64, 7, 64, 1, 1),
    (3, 5, 9, 16, 2, 1),
    (2, 1, 28, 64, 2, 3),
    (4, 3, 7, 32, 2, 3),
    (2, 8, 5, 64, 1, 2),
    (1, 4, 1, 16, 1, 1),
    (2, 4, 2, 16, 2, 1),
    (2, 32, 9, 32, 1, 8),
]


def conv_inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor, Tensor, int]:
    """x (channels-last), weight and ∂y of a 3x3 convolution with padding 1; the stride."""
    b, c_in, side, c_out, stride, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, groups * c_in, side, side, generator=g)
    weight = torch.randn(groups * c_out, c_in, 3, 3, generator=g)
    y = F.conv2d(x, weight, stride=stride, padding=1, groups=groups)
    d_y = torch.randn(y.shape, generator=g).contiguous(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last), weight, d_y, stride


@needs_native_conv
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_native_conv_weight_gradient_matches_float64(shape: tuple[int, ...]) -> None:
    """∂W against float64's, as close as oneDNN's own float32 one, for every padding case."""
    x, weight, d_y, stride = conv_inputs(shape)
    got = layers._native_weight_gradient(x, d_y, weight, stride)
    assert got is not None and got.shape == weight.shape
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    y64 = F.conv2d(x64, w64, stride=stride, padding=1, groups=x.shape[1] // weight.shape[1])
    (want,) = torch.autograd.grad(y64, w64, d_y.double())
    assert_close(got.double(), want, rtol=0.0, atol=2e-6 * want.abs().max().item())


@needs_native_conv
@pytest.mark.parametrize("shape", [(6, 32, 23, 32, 1, 1), (3, 32, 13, 32, 1, 8)])
def test_native_conv_weight_gradient_is_the_same_for_any_thread_count(
    shape: tuple[int, ...],
) -> None:
    """One episode, and eight as groups of one pass (each group's input channels tiled apart)."""
    x, weight, d_y, stride = conv_inputs(shape)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(layers._native_weight_gradient(x, d_y, weight, stride))
    torch.set_num_threads(1)
    assert all(torch.equal(results[0], other) for other in results[1:])


@needs_native_conv
def test_conv3x3_takes_the_native_weight_gradient_where_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """conv3x3's backward: the native ∂W on float32 CPU tensors with 16, 32 or 64 filters per
    group; oneDNN's on one thread for other filter counts, float64, and under create_graph,
    whose ∂W is differentiable (second-order MAML)."""
    taken = []
    original = layers._native_weight_gradient

    def spy(*args: Any) -> Tensor | None:
        result = original(*args)
        taken.append("n" if result is not None else "r")
        return result

    monkeypatch.setattr(layers, "_native_weight_gradient", spy)
    for shape, dtype in [((2, 3, 8, 32, 1, 1), torch.float32), ((2, 3, 8, 24, 1, 1), torch.float32),
                         ((2, 3, 8, 32, 1, 1), F64)]:  # fmt: skip
        x, weight, d_y, stride = conv_inputs(shape)
        w = weight.to(dtype).requires_grad_()
        (d_w,) = torch.autograd.grad(layers.conv3x3(x.to(dtype), w, stride), w, d_y.to(dtype))
        assert d_w.dtype == dtype
    assert taken == ["n", "r", "r"]
    x, weight, d_y, stride = conv_inputs((2, 3, 8, 32, 1, 1))
    w = weight.requires_grad_()
    (d_w,) = torch.autograd.grad(layers.conv3x3(x, w, stride), w, d_y, create_graph=True)
    assert taken == ["n", "r", "r"] and d_w.requires_grad
    assert layers.conv_kernels().startswith("native")
    assert layers.conv_kernels(torch.device("cpu"), 24) == "eager (one thread)"
    assert layers.conv_kernels(torch.device("cuda"), 32) == "eager"


# -- the native block tail: batch norm, max-pool and ReLU -----------------------------------------

needs_native_block = pytest.mark.skipif(
    not metalstm_native.available(layers.BLOCK_SOURCE),
    reason=f"native block kernels unavailable here: {layers.block_kernels()}",
)


def tail_inputs(shape: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    """x [B, C, H, W] (channels-last) and the shift, γ, β of a block, all requiring gradients;
    γ of both signs and 0 (the native forward finds a window's maximum from its largest, smallest
    or first input), β spread so that some channels are mostly cut by the ReLU and others mostly
    pass."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (2 * torch.randn(shape, generator=g) + 0.5).contiguous(memory_format=torch.channels_last)
    gamma = (torch.rand(c, generator=g) + 0.5) * torch.tensor([1.0, -1.0]).repeat(c)[:c]
    gamma[3::7] = 0.0
    params = [torch.randn(c, generator=g), gamma]
    params.append(torch.linspace(-1.5, 1.5, c))
    return [t.requires_grad_() for t in (x, *params)]


@needs_native_block
@pytest.mark.parametrize(
    "shape", [(5, 32, 28, 28), (3, 8, 21, 21), (2, 16, 5, 4), (4, 24, 7, 6), (2, 64, 3, 3)]
)
def test_native_block_tail_matches_pytorch(shape: tuple[int, ...]) -> None:
    """Output, statistics and every gradient, for even and odd sides (rows and columns that
    belong to no pooling window), against the PyTorch composition."""
    inputs = tail_inputs(shape)
    native_out = layers._NativeTail.apply(*inputs, 1e-5)
    torch_out = layers._reference_tail(*inputs, 1e-5)
    for a, b in zip(native_out, torch_out):
        assert_close(a, b, rtol=1e-6)
    assert native_out[0].is_contiguous(memory_format=torch.channels_last)
    d_out = torch.randn(native_out[0].shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(native_out[0], inputs, d_out)
    want = torch.autograd.grad(torch_out[0], inputs, d_out)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=2e-6)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # the conv bias cancels exactly


@needs_native_block
def test_native_block_tail_matches_pytorch_where_windows_tie() -> None:
    """Activations on a coarse grid (many windows whose maximum, or minimum, is shared by two or
    more pixels; γ of both signs and 0): the forward's extremes are the first of the tied pixels,
    where PyTorch's max-pool sends the gradient, so every gradient agrees."""
    x, *params = tail_inputs((4, 24, 10, 10))
    x = x.detach().round().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    inputs = [x, *params]
    assert tied_window_share(x.detach()) > 0.2
    native_out = layers._NativeTail.apply(*inputs, 1e-5)
    torch_out = layers._reference_tail(*inputs, 1e-5)
    for a, b in zip(native_out, torch_out):
        assert_close(a, b, rtol=1e-6)
    d_out = torch.randn(native_out[0].shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(native_out[0], inputs, d_out)
    want = torch.autograd.grad(torch_out[0], inputs, d_out)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=2e-6, atol=1e-6)


@needs_native_block
def test_native_block_statistics_hold_far_from_zero() -> None:
    """Mean and variance from one pass of shifted sums: a mean 100 standard deviations from 0
    still gives float64's statistics to float32 rounding."""
    x, *params = (t.detach() for t in tail_inputs((4, 16, 12, 12)))
    x = (x + 200.0).contiguous(memory_format=torch.channels_last)
    _, mean, var = layers._NativeTail.apply(x, *params, 1e-5)
    exact = layers._reference_tail(x.double(), *(t.double() for t in params), 1e-5)
    assert_close(mean.double(), exact[1], rtol=1e-7)
    assert_close(var.double(), exact[2], rtol=1e-6)


@needs_native_block
def test_native_block_tail_takes_nchw_input() -> None:
    """An NCHW x is read through a channels-last copy; its gradient reaches the original."""
    x, *params = tail_inputs((3, 16, 10, 10))
    x_nchw = x.detach().contiguous().requires_grad_()
    out = layers._NativeTail.apply(x_nchw, *params, 1e-5)[0]
    want = layers._reference_tail(x, *params, 1e-5)[0]
    assert_close(out, want, rtol=1e-6)
    (got_dx,) = torch.autograd.grad(out.sum(), x_nchw)
    (want_dx,) = torch.autograd.grad(want.sum(), x)
    assert_close(got_dx, want_dx, rtol=2e-6)


@needs_native_block
def test_native_block_tail_is_the_same_for_any_thread_count() -> None:
    inputs = tail_inputs((6, 16, 30, 30))
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = layers._NativeTail.apply(*inputs, 1e-5)
        results.append([*out, *torch.autograd.grad(out[0], inputs, torch.ones_like(out[0]))])
    torch.set_num_threads(1)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_native_block
def test_native_block_tail_has_second_derivatives() -> None:
    """Under ``create_graph`` (second-order MAML) the backward differentiates the PyTorch
    composition: the gradient's own gradient agrees with the PyTorch path's."""
    inputs = tail_inputs((4, 8, 12, 12))
    v = torch.randn(4, 8, 12, 12, generator=torch.Generator().manual_seed(2))
    second = []
    for tail in (layers._NativeTail.apply, layers._reference_tail):
        out = tail(*inputs, 1e-5)[0]
        (d_x,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
        second.append(torch.autograd.grad((d_x * v).sum(), inputs[2:]))
    for a, b in zip(*second):
        assert_close(a, b, rtol=1e-5)


def given_tail_inputs(shape: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    """x [B, C, H, W] (channels-last), running mean and variance [C] (constants) far from the
    batch's own, and γ, β; x, γ and β require gradients."""
    x, _, gamma, beta = (t.detach() for t in tail_inputs(shape, seed))
    g = torch.Generator().manual_seed(seed + 1)
    mean, var = torch.randn(shape[1], generator=g), 3 * torch.rand(shape[1], generator=g) + 0.2
    return [x.requires_grad_(), mean, var, gamma.requires_grad_(), beta.requires_grad_()]


@needs_native_block
@pytest.mark.parametrize("shape", [(5, 32, 28, 28), (3, 8, 21, 21), (4, 24, 7, 6), (2, 64, 3, 3)])
def test_native_given_statistics_tail_matches_pytorch(shape: tuple[int, ...]) -> None:
    """With running statistics (evaluation, fine-tuning): output and the gradients of x, γ, β,
    for even and odd sides, against ``F.batch_norm`` in eval mode, max-pool and ReLU."""
    x, _, _, gamma, beta = inputs = given_tail_inputs(shape)
    got_out = layers._NativeGivenTail.apply(*inputs, 1e-5)
    want_out = layers._reference_given_tail(*inputs, 1e-5)
    assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    assert got_out.is_contiguous(memory_format=torch.channels_last)
    d_out = torch.randn(got_out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(got_out, (x, gamma, beta), d_out)
    want = torch.autograd.grad(want_out, (x, gamma, beta), d_out)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=2e-6, atol=1e-6)


@needs_native_block
def test_native_given_statistics_tail_is_the_same_for_any_thread_count() -> None:
    x, _, _, gamma, beta = inputs = given_tail_inputs((6, 16, 30, 30))
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = layers._NativeGivenTail.apply(*inputs, 1e-5)
        results.append([out, *torch.autograd.grad(out, (x, gamma, beta), torch.ones_like(out))])
    torch.set_num_threads(1)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_native_block
def test_native_given_statistics_tail_has_second_derivatives() -> None:
    x, _, _, gamma, beta = inputs = given_tail_inputs((4, 8, 12, 12))
    v = torch.randn(4, 8, 12, 12, generator=torch.Generator().manual_seed(2))
    second = []
    for tail in (layers._NativeGivenTail.apply, layers._reference_given_tail):
        out = tail(*inputs, 1e-5)
        (d_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        second.append(torch.autograd.grad((d_x * v).sum(), (gamma, beta)))
    for a, b in zip(*second):
        assert_close(a, b, rtol=1e-5)


@needs_native_block
def test_given_statistics_take_the_native_kernels_where_they_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float32 go native; float64 and channel counts off the multiple of 8 take the PyTorch
    operators, as do statistics that require a gradient (which PyTorch refuses, as before); the
    learner's evaluation pass (running statistics) goes native."""
    taken: list[str] = []
    native_apply, reference = layers._NativeGivenTail.apply, layers._reference_given_tail
    monkeypatch.setattr(
        layers._NativeGivenTail, "apply", lambda *a: taken.append("n") or native_apply(*a)
    )
    monkeypatch.setattr(
        layers, "_reference_given_tail", lambda *a: taken.append("r") or reference(*a)
    )
    for shape, dtype in [
        ((2, 8, 6, 6), torch.float32),
        ((2, 8, 6, 6), F64),
        ((2, 6, 6, 6), torch.float32),
    ]:
        x, *statistics, gamma, beta = (t.detach().to(dtype) for t in given_tail_inputs(shape))
        layers.normalise_pool_relu(x, *statistics, gamma, beta, 1e-5)
    x, mean, var, gamma, beta = (t.detach() for t in given_tail_inputs((2, 8, 6, 6)))
    with pytest.raises(RuntimeError, match="running_mean"):
        layers.normalise_pool_relu(x, mean.requires_grad_(), var, gamma, beta, 1e-5)
    assert taken == ["n", "r", "r", "r"]
    taken.clear()
    learner = Learner(LearnerShape(1, 28, 5, 16))
    bn = learner.fresh_batchnorm_state()
    learner(learner.initial_theta(), torch.rand(5, 1, 28, 28), bn, batch_stats=False)
    # the first block's tail runs fused with its convolution where that pays (AVX-512 builds)
    assert taken == ["n"] * (3 if layers._fusion_pays() else 4)


def first_block_inputs(
    images: int, inputs: int, filters: int, side: tuple[int, int], groups: int = 1
) -> list[Tensor]:
    """x [B, G·C_in, H, W] (channels-last), a conv weight [G·C_out, C_in, 3, 3], running mean and
    variance, γ and β [G·C_out]: a first block, nothing requiring a gradient."""
    g = torch.Generator().manual_seed(images + 7 * filters + side[1])
    x = to_channels_last(torch.rand(images, groups * inputs, *side, generator=g))
    weight = torch.randn(groups * filters, inputs, 3, 3, generator=g) / 3
    channels = groups * filters
    mean, var = 0.1 * torch.randn(channels, generator=g), torch.rand(channels, generator=g) / 4
    gamma, beta = torch.randn(channels, generator=g), torch.linspace(-0.5, 0.5, channels)
    return [x, weight, mean, var + 0.01, gamma, beta]


def reference_first_block(
    x: Tensor,
    weight: Tensor,
    mean: Tensor | None,
    var: Tensor | None,
    gamma: Tensor,
    beta: Tensor,
    shift: Tensor | None = None,
) -> Tensor:
    """conv (+ ``shift``) → BN with the given statistics (None: the batch's) → max-pool → ReLU
    by PyTorch operators in float64."""
    groups = x.shape[1] // weight.shape[1]
    y = F.conv2d(x.double(), weight.double(), padding=1, groups=groups)
    if shift is not None:
        y = y + shift.double().view(1, -1, 1, 1)
    given = mean is not None and var is not None
    statistics = (mean.double(), var.double()) if given else (None, None)
    y = F.batch_norm(y, *statistics, gamma.double(), beta.double(), not given, eps=1e-5)
    return F.relu(F.max_pool2d(y, 2))


FIRST_BLOCKS = [
    (75, 1, 64, (28, 28), 1),
    (5, 3, 32, (84, 84), 1),
    (4, 1, 16, (28, 28), 8),
    (3, 3, 32, (13, 10), 2),
    (2, 4, 48, (7, 9), 1),
    (2, 2, 64, (2, 3), 1),
]


@pytest.fixture
def fusion_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The learner's layers fuse a first block's convolution on every machine, including where
    an AVX2 build runs it apart for speed (layers._fusion_pays): the fused kernel is tested
    everywhere."""
    monkeypatch.setattr(layers, "_fusion_pays", lambda: True)


@needs_native_block
@pytest.mark.parametrize("shape", FIRST_BLOCKS)
def test_first_block_fused_with_its_convolution_matches_pytorch(
    shape: tuple[int, int, int, tuple[int, int], int], fusion_everywhere: None
) -> None:
    """The first block at evaluation in one native pass (convolution included): its output
    against PyTorch's operators in float64, and against the convolution then the native tail
    (what runs otherwise) in float32, for 1-4 channels, groups (batches of episodes), 16 to 64
    filters per group and odd sides; the same bits for any thread count."""
    inputs = first_block_inputs(*shape)
    x, weight, *given = inputs
    assert layers.fuses_conv(*inputs, batch_stats=False)
    fused = layers.conv_normalise_pool_relu(*inputs, 1e-5)
    assert fused.is_contiguous(memory_format=torch.channels_last)
    assert_close(fused.double(), reference_first_block(*inputs), rtol=1e-5, atol=1e-5)
    conv = to_channels_last(layers.conv3x3(x, weight))
    assert_close(fused, layers.normalise_pool_relu(conv, *given, 1e-5), rtol=1e-6, atol=1e-6)
    for threads in (2, 3):
        torch.set_num_threads(threads)
        assert torch.equal(layers.conv_normalise_pool_relu(*inputs, 1e-5), fused)
    torch.set_num_threads(1)


def reference_batch_block(
    x: Tensor, weight: Tensor, shift: Tensor, gamma: Tensor, beta: Tensor, _eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """What ``layers._NativeConvTail`` returns, by PyTorch's operators in float64: the first
    block's output with the batch's statistics (:func:`reference_first_block`), and the mean and
    biased variance of the convolution plus ``shift``."""
    y = F.conv2d(x.double(), weight.double(), padding=1, groups=x.shape[1] // weight.shape[1])
    y = y + shift.double().view(1, -1, 1, 1)
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    return reference_first_block(x, weight, None, None, gamma, beta, shift), mean, var


def tied_window_share(y: Tensor) -> float:
    """The share of y's 2x2 windows (y [B, C, H, W], even sides) whose maximum two or more
    pixels take."""
    windows = y.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # [B, C, H/2, W/2, 4]
    return (windows == windows.amax(-1, keepdim=True)).sum(-1).gt(1).float().mean().item()


def first_block_gradients(
    block: Any, x: Tensor, weight: Tensor, shift: Tensor, gamma: Tensor, beta: Tensor
) -> list[Tensor]:
    """The output, mean and variance of ``block`` (a first block with the batch's statistics)
    and the gradients of a fixed function of its output w.r.t. the conv weight, the shift, γ, β."""
    params = [t.detach().clone().requires_grad_() for t in (weight, shift, gamma, beta)]
    out, *statistics = block(x, params[0], params[1], params[2], params[3], 1e-5)
    d_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return [out, *statistics, *torch.autograd.grad(out, params, d_out)]


@needs_native_block
@pytest.mark.parametrize("shape", FIRST_BLOCKS)
def test_first_block_with_batch_statistics_fused_matches_pytorch(
    shape: tuple[int, int, int, tuple[int, int], int],
) -> None:
    """The first block with the batch's statistics, its convolution computed inside the native
    kernels (once forward, once back): output, mean, variance and the gradients of the conv
    weight, the conv bias (exactly zero), γ and β against PyTorch's operators in float64 (the
    batch's statistics through F.batch_norm, a conv bias that cancels), with γ of both signs and
    0 (the forward finds a window's maximum from its outputs' largest, smallest or first); the
    same bits for any thread count."""
    x, weight, _, _, gamma, beta = first_block_inputs(*shape)
    gamma[::7] = 0.0
    assert (gamma > 0).any() and (gamma < 0).any()
    shift = torch.linspace(-0.3, 0.3, weight.shape[0])
    got = first_block_gradients(layers._NativeConvTail.apply, x, weight, shift, gamma, beta)
    want = first_block_gradients(reference_batch_block, x, weight, shift, gamma, beta)
    for name, a, b in zip(["out", "mean", "var", "weight", "shift", "γ", "β"], got, want):
        if name == "shift":  # the bias cancels: exactly zero here, rounding noise in float64
            assert torch.equal(a, torch.zeros_like(a)) and b.abs().max() < 1e-9
        else:
            assert_close(a.double(), b, rtol=2e-5), name
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for threads in (2, 3):
        torch.set_num_threads(threads)
        again = first_block_gradients(layers._NativeConvTail.apply, x, weight, shift, gamma, beta)
        assert all(torch.equal(a, b) for a, b in zip(got, again))
    torch.set_num_threads(1)


@needs_native_block
def test_first_block_with_batch_statistics_fused_matches_pytorch_on_binary_images() -> None:
    """Binary images with flat regions, as Omniglot's are: there windows' convolution outputs
    tie exactly; the fused block (its extremes the first of the tied pixels, as
    PyTorch's max-pool takes) against PyTorch's operators in float64."""
    x, weight, _, _, gamma, beta = first_block_inputs(6, 1, 32, (28, 28), 2)
    strokes = torch.rand(6, 2, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.6
    x = strokes.float().repeat_interleave(4, 2).repeat_interleave(4, 3)  # flat 4x4 regions
    x = x.contiguous(memory_format=torch.channels_last)
    gamma[::5] = 0.0
    shift = torch.zeros(weight.shape[0])
    assert tied_window_share(F.conv2d(x, weight, padding=1, groups=2)) > 0.2
    got = first_block_gradients(layers._NativeConvTail.apply, x, weight, shift, gamma, beta)
    want = first_block_gradients(reference_batch_block, x, weight, shift, gamma, beta)
    for name, a, b in zip(["out", "mean", "var", "weight", "shift", "γ", "β"], got, want):
        if name != "shift":
            assert_close(a.double(), b, rtol=2e-5, atol=1e-6)


@needs_native_block
def test_first_block_with_batch_statistics_has_second_derivatives() -> None:
    """Under create_graph (second-order MAML) the fused block's backward differentiates the
    PyTorch composition: the same second derivatives."""
    x, weight, _, _, gamma, beta = first_block_inputs(3, 1, 16, (10, 10))
    shift = torch.zeros(16)
    second = []
    for block in (layers._NativeConvTail.apply, layers._reference_conv_tail):
        params = [t.clone().requires_grad_() for t in (weight, gamma, beta)]
        out = block(x, params[0], shift, params[1], params[2], 1e-5)
        out = out[0] if isinstance(out, tuple) else out
        (d_weight,) = torch.autograd.grad(out.square().sum(), params[0], create_graph=True)
        second.append(torch.autograd.grad(d_weight.square().sum(), params))
    for a, b in zip(*second):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_native_block
def test_first_block_fused_with_its_convolution_keeps_nan(fusion_everywhere: None) -> None:
    """A NaN pixel makes NaN every window whose convolutions read it, as the PyTorch operators
    do, and nothing else (given statistics)."""
    x, *rest = first_block_inputs(2, 1, 16, (8, 8))
    x = x.clone()
    x[1, 0, 3, 4] = float("nan")
    inputs = [to_channels_last(x), *rest]
    fused, want = layers.conv_normalise_pool_relu(*inputs, 1e-5), reference_first_block(*inputs)
    assert torch.equal(fused.isnan(), want.isnan()) and fused.isnan().any()
    assert_close(fused.nan_to_num().double(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


@needs_native_block
def test_only_a_first_block_of_images_fuses_its_convolution(
    monkeypatch: pytest.MonkeyPatch, fusion_everywhere: None
) -> None:
    """The learner's passes fuse the first block's convolution (with the batch's statistics, and
    with running ones where no gradient is needed: evaluation's query pass) and only there: not
    with running statistics and θ requiring a gradient, not for images requiring one, not in
    float64, not past the first block, not for 5 input channels or 24 filters; the logits and
    θ's gradient are the same either way."""
    fused: list[str] = []  # g: with given statistics, b: with the batch's
    forward = layers._native_conv_forward
    monkeypatch.setattr(
        layers,
        "_native_conv_forward",
        lambda *a: fused.append("b" if a[-1] is not None else "g") or forward(*a),
    )
    learner = Learner(LearnerShape(1, 28, 5, 32))
    theta, x = learner.initial_theta().requires_grad_(), torch.rand(6, 1, 28, 28)
    y = torch.arange(6) % 5
    bn = learner.fresh_batchnorm_state()
    loss = F.cross_entropy(learner(theta, x, bn, batch_stats=True), y)  # a support pass
    (grad,) = torch.autograd.grad(loss, theta)
    assert fused == ["b"]
    with torch.no_grad():
        logits = learner(theta, x, bn, batch_stats=False)
    assert fused == ["b", "g"]
    fused.clear()
    graph = learner(theta, x, bn, batch_stats=False)
    learner(theta, x.clone().requires_grad_(), learner.fresh_batchnorm_state(), batch_stats=True)
    bn64 = {k: v.double() for k, v in bn.items()}
    learner(theta.detach().double(), x.double(), bn64, batch_stats=False)
    assert fused == []
    assert_close(logits, graph.detach(), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(layers, "fuses_conv", lambda *a, **k: False)  # the two-step path
    (unfused,) = torch.autograd.grad(
        F.cross_entropy(learner(theta, x, learner.fresh_batchnorm_state(), True), y), theta
    )
    assert_close(grad, unfused, rtol=1e-4, atol=1e-7)
    for inputs in (first_block_inputs(2, 5, 16, (8, 8)), first_block_inputs(2, 1, 24, (8, 8))):
        assert not layers.fuses_conv(*inputs, batch_stats=True)


@needs_native_block
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags on Linux")
def test_first_block_fuses_its_convolution_only_where_the_build_is_avx512(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The library built here (-march=native) fuses a first block's convolution exactly where
    the CPU has AVX-512 (its AVX2 build ran the fused block 3-27 times slower than the
    convolution and the native tail apart); where it does not, the learner takes the two-step
    path."""
    flags = next(
        line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
    )
    assert layers._fusion_pays() == ("avx512f" in flags.split())
    inputs = first_block_inputs(4, 1, 16, (28, 28))
    monkeypatch.setattr(layers, "_fusion_pays", lambda: False)
    assert not layers.fuses_conv(*inputs, batch_stats=False)
    monkeypatch.setattr(layers, "_fusion_pays", lambda: True)
    assert layers.fuses_conv(*inputs, batch_stats=False)


@needs_native_block
def test_block_tail_takes_the_native_kernels_where_they_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float32 CPU tensors with C a multiple of 8 go native; float64 (the finite-difference
    and reference tests) and other channel counts take the PyTorch operators."""
    taken: list[str] = []
    native_apply, reference = layers._NativeTail.apply, layers._reference_tail
    monkeypatch.setattr(
        layers._NativeTail, "apply", lambda *a: taken.append("n") or native_apply(*a)
    )
    monkeypatch.setattr(layers, "_reference_tail", lambda *a: taken.append("r") or reference(*a))
    for shape, dtype in [
        ((2, 8, 6, 6), torch.float32),
        ((2, 8, 6, 6), F64),
        ((2, 6, 6, 6), torch.float32),
    ]:
        x, *params = (t.detach().to(dtype) for t in tail_inputs(shape))
        layers.batch_norm_pool_relu(x, *params, 1e-5)
    assert taken == ["n", "r", "r"]
    assert layers.block_kernels().startswith("native")
    assert layers.block_kernels(torch.device("cpu"), 64).startswith("native")
    assert layers.block_kernels(torch.device("cpu"), 12) == "eager"
    assert layers.block_kernels(torch.device("cuda"), 64) == "eager"
    strided = layers.block_kernels(torch.device("cpu"), 64, pooled=False)
    assert strided == "eager (no max-pool to fuse)"


@needs_native_block
def test_native_kernels_can_be_chosen_by_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``METALSTM_NATIVE=native_step``: the step's native kernels, the block's PyTorch ones."""
    monkeypatch.setenv("METALSTM_CACHE", str(tmp_path))
    monkeypatch.setenv("METALSTM_NATIVE", "native_step")
    metalstm_native.load.cache_clear()
    try:
        assert native.status().startswith("native")
        why = "eager (native unavailable: turned off by METALSTM_NATIVE=native_step)"
        assert layers.block_kernels() == why
    finally:
        metalstm_native.load.cache_clear()


# -- the benchmark ------------------------------------------------------------------------------


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bench_reports_its_figures(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    args = bench_args(
        "--image-size", "16", "--filters", "4", "--ways", "3", "--queries", "2", "--steps", "2",
        "--episodes", "2", "--warmup", "1", "--device", "cpu", "--mode", mode, "--out", str(out),
    )  # fmt: skip
    result = bench_main(args)
    for key in ("s_per_episode", "episodes_per_s", "gflop_per_episode", "gflops", "peak_memory_mb"):
        assert result[key] > 0, key
    assert result["settings"]["mode"] == mode and result["settings"]["batch"] == 3
    assert json.loads(out.read_text())["s_per_episode"] == result["s_per_episode"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-5].startswith("seconds per episode") and lines[-1].startswith("peak memory")
    # which step kernels ran, in the header line and the JSON
    assert f"meta-learner step: {result['settings']['step_kernels']}" in lines[-6]
    assert result["settings"]["step_kernels"] == native.status()
    assert f"learner block: {result['settings']['block_kernels']}" in lines[-6]
    assert result["settings"]["block_kernels"] == "eager"  # 4 filters: not a multiple of 8


def test_bench_json_is_the_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = bench_args(
        "--image-size", "16", "--filters", "4", "--ways", "2", "--queries", "1", "--steps", "1",
        "--episodes", "1", "--warmup", "0", "--device", "cpu", "--meta-batch", "2", "--json",
    )  # fmt: skip
    bench_main(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["timed_episodes"] == 2 and result["settings"]["meta_batch"] == 2


def test_bench_times_the_strided_learner(capsys: pytest.CaptureFixture[str]) -> None:
    args = bench_args(
        "--image-size", "16", "--filters", "8", "--ways", "2", "--queries", "1", "--steps", "1",
        "--episodes", "1", "--warmup", "0", "--device", "cpu", "--downsample", "stride", "--json",
    )  # fmt: skip
    result = bench_main(args)
    assert result["settings"]["downsample"] == "stride"
    assert result["settings"]["block_kernels"] == "eager (no max-pool to fuse)"
    # the same parameters as the pooled learner (16 → 8 → 4 → 2 → 1 either way), fewer FLOPs
    # (a quarter of the pixels in each convolution; the meta-learner's share is the same)
    strided = bench_config(args)
    pooled = override(strided, {"downsample": "pool"})
    n = result["settings"]["learner_params"]
    assert n == build_method(pooled).learner.n_params
    flops = [episode_flops(config, n, 2, "train") for config in (strided, pooled)]
    assert result["gflop_per_episode"] * 1e9 == pytest.approx(flops[0], rel=1e-6)
    assert flops[0] < flops[1]


def test_flop_estimate_of_the_issue_workloads() -> None:
    """The issue's floors: about 6, 26 and 47 GFLOP per meta-training episode."""
    n28 = Learner(LearnerShape(1, 28, 5, 32)).n_params
    n84 = Learner(LearnerShape(3, 84, 5, 32)).n_params
    omniglot = override(Config(), {"image_size": 28, "channels": 1, "inner_steps": 12})
    one_shot = override(Config(), {"image_size": 84, "channels": 3, "inner_steps": 12})
    five_shot = override(Config(), {"image_size": 84, "channels": 3, "k_shot": 5, "inner_steps": 8})
    assert episode_flops(omniglot, n28, 5, "train") / 1e9 == pytest.approx(6, rel=0.15)
    assert episode_flops(one_shot, n84, 5, "train") / 1e9 == pytest.approx(26, rel=0.15)
    assert episode_flops(five_shot, n84, 25, "train") / 1e9 == pytest.approx(47, rel=0.15)


# -- CUDA --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_meta_gradient_and_logits_match_cpu() -> None:
    cfg = config()
    cpu = perturbed_model(cfg)
    gpu = perturbed_model(cfg).to("cuda")
    ep = episode(cfg)
    ep_gpu = ep.to("cuda")
    cpu_grads = grads(cpu, cpu.meta_loss(ep).loss)
    gpu_grads = grads(gpu, gpu.meta_loss(ep_gpu).loss)
    for name in cpu_grads:
        assert_close(gpu_grads[name].cpu(), cpu_grads[name], rtol=1e-9, atol=1e-13)
    cpu.eval()
    gpu.eval()
    logits = gpu.predict(ep_gpu.support_x, ep_gpu.support_y, ep_gpu.query_x).cpu()
    assert_close(logits, cpu.predict(ep.support_x, ep.support_y, ep.query_x), rtol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["lstm", "maml"])
def test_cuda_batch_of_episodes_matches_cpu(method: str) -> None:
    """The batched pass of three episodes (grouped convolutions, per-episode θ) on CUDA: the
    meta-gradient and the adapted logits of the same float64 batch on the CPU."""
    cfg = config(method=method, episode_batch=3)
    cpu = build_method(cfg).double()
    gpu = build_method(cfg).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    episodes = [episode(cfg, seed=seed) for seed in range(3)]
    batch = Episodes.stack(episodes)
    on_gpu = Episodes.stack([e.to("cuda") for e in episodes])
    cpu_grads = grads(cpu, cpu.meta_loss(batch).loss)
    gpu_grads = grads(gpu, gpu.meta_loss(on_gpu).loss)
    for name in cpu_grads:
        assert_close(gpu_grads[name].cpu(), cpu_grads[name], rtol=1e-9, atol=1e-13)
    with torch.no_grad():
        expected = cpu.adapt(batch.support_x, batch.support_y)(batch.query_x)
        actual = gpu.adapt(on_gpu.support_x, on_gpu.support_y)(on_gpu.query_x).cpu()
    assert_close(actual, expected, rtol=1e-9)


def test_the_prepared_gpu_check_runs_every_phase(tmp_path: Path) -> None:
    """benchmarks/gpu.py, the script a session with a GPU runs (its dry run on the CPU): every
    phase runs, and its four files hold the tables and figures of each timing phase."""
    script = BENCHMARKS / "gpu.py"
    command = [sys.executable, str(script), "--device", "cpu", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.md").read_text()
    for phase in ("check", "batches", "meta-batch-32", "compile"):
        assert f"| {phase} | ok |" in summary
    assert "skipped" in (tmp_path / "check.txt").read_text()  # the CUDA tests, without CUDA
    figures = json.loads((tmp_path / "throughput.json").read_text())
    assert sorted(figures) == ["batches", "compile", "meta-batch-32"]
    for phase in figures.values():
        (runs,) = phase["runs"].values()
        assert runs["28g-5w1s"][0]["s_per_episode"] > 0
    assert summary.count("| 28g-5w1s |") == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_the_gpu_check_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCHMARKS / "gpu.py"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr
    assert not (tmp_path / "out").exists()


def test_time_breakdown_charges_every_part_of_an_episode() -> None:
    script = BENCHMARKS / "time_breakdown.py"
    command = [
        sys.executable, str(script), "--image-size", "16", "--filters", "4", "--ways", "3",
        "--queries", "2", "--steps", "2", "--episodes", "2", "--warmup", "1", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip(" *`") for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].replace(".", "").isdigit():
            rows.setdefault(cells[0], float(cells[1]))  # parts first, then operators
    parts = [
        "learner: support passes (L_t, g_t)",
        "meta-learner LSTM: forward (preprocessing, both layers, update)",
        "meta-learner LSTM: backward",
        "learner: query pass",
        "learner: backward of the query loss into θ_T",
        "optimizer: zero_grad, clipping, Adam",
    ]
    for part in parts:
        assert rows[part] > 0, part
    listed = sum(rows[p] for p in [*parts, "episode sampling", "other"] if p in rows)
    assert listed == pytest.approx(rows["total"], abs=0.1 * len(parts))
    assert rows.get("other", 0.0) < 0.25 * rows["total"]  # nearly everything is attributed


def load_benchmark(name: str) -> Any:
    """The module of ``benchmarks/NAME.py`` (the scripts are not a package)."""
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lstm_kernel_work(prof: Any, hidden: int) -> tuple[int, int, int]:
    """(sigmoid elements, tanh elements, FLOPs of the layer-1 products) a profile recorded."""
    sigmoid = tanh = flops = 0
    for event in prof.events():
        kind, shapes = event.name.removeprefix("aten::").rstrip("_"), event.input_shapes
        if kind == "sigmoid":
            sigmoid += math.prod(shapes[0])
        elif kind == "tanh":
            tanh += math.prod(shapes[0])
        elif kind in ("mm", "addmm"):
            first = 1 if kind == "addmm" else 0  # addmm(bias, mat1, mat2)
            (m, k), (_, n) = shapes[first : first + 2]
            if 4 * hidden in (m, k):  # layer 1's forward product or its backward's
                flops += 2 * m * k * n
    return sigmoid, tanh, flops


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_throughput_lstm_floor_counts_the_episode_kernels(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """throughput.py's "LSTM kernels" floor charges exactly the sigmoid and tanh elements and
    the layer-1 product FLOPs of an episode (counted with the profiler on the eager kernels,
    whose operators it sees), each at its own rate."""
    monkeypatch.setattr(native, "default_kernels", lambda: ml.EAGER_KERNELS)
    throughput = load_benchmark("throughput")
    cfg = small_config(hidden_size=6, inner_steps=3)
    model = MetaLSTM(cfg)
    ep = episode(cfg, dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        if mode == "train":
            model.meta_loss(ep).loss.backward()
        else:
            with torch.no_grad():
                model.inner_loop(ep.support_x, ep.support_y, cfg.settings.inner_steps)
    sigmoid, tanh, flops = lstm_kernel_work(prof, cfg.settings.hidden_size)
    assert sigmoid > 0 and tanh > 0 and flops > 0
    rates = {"sigmoid_ns": 1.0, "tanh_ns": 1000.0, "lstm_product_gflops": 1e-3}  # tell apart
    settings = {
        "mode": mode,
        "second_order": False,
        "steps": cfg.settings.inner_steps,
        "learner_params": model.learner.n_params,
        "hidden": cfg.settings.hidden_size,
    }
    expected = (sigmoid * 1.0 + tanh * 1000.0 + flops / rates["lstm_product_gflops"]) / 1e9  # ns
    seconds = throughput.lstm_kernel_seconds({"settings": settings}, rates)
    assert seconds == pytest.approx(expected, rel=1e-12)


def test_throughput_table_shows_a_dash_for_figures_a_workload_does_not_measure() -> None:
    throughput = load_benchmark("throughput")
    train = {"s_per_episode": 0.5, "gflop_per_episode": 4.0, "gflops": 8.0, "peak_memory_mb": 512}
    runs = {"28g-5w1s": [train, {**train, "peak_memory_mb": 520}]}
    kernels = {"step_kernels": "eager (why)", "block_kernels": "native (C++)"}
    runs["omniglot-eval600"] = [{"seconds": 90.0, "settings": kernels}]
    rows = {
        line.split(" | ")[0]: line.split(" | ") for line in throughput.table(runs, {}).split("\n")
    }
    assert rows["| 28g-5w1s"][8] == "516"
    assert rows["| omniglot-eval600"][8] == "-"
    assert "Meta-learner step kernels: eager (why)." in throughput.table(runs, {})
    assert "Learner block kernels: native (C++)." in throughput.table(runs, {})
