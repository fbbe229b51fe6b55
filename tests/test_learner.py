"""The learner: the paper's Conv-4 evaluated on a flat parameter vector θ."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from conftest import reference_net
from metalstm import Learner, LearnerShape
from metalstm.learner import ConvNet, conv_flops, conv_sides, feature_dim, feature_side

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    """|actual − expected| ≤ atol + rtol·|expected| elementwise, same shape and dtype."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    diff = (actual.detach() - expected.detach()).abs()
    bad = ~(diff <= atol + rtol * expected.detach().abs())
    assert not bad.any(), f"{int(bad.sum())}/{diff.numel()} differ, max {diff.max().item():.3e}"


def expected_names() -> list[str]:
    names = []
    for i in range(4):
        names += [f"blocks.{i}.{m}.{p}" for m in ("conv", "norm") for p in ("weight", "bias")]
    return [*names, "head.weight", "head.bias"]


def random_theta(learner: Learner, seed: int, dtype: torch.dtype = F64) -> Tensor:
    """A θ away from the default init (BN scales not all 1, shifts not all 0)."""
    g = torch.Generator().manual_seed(seed)
    theta = learner.initial_theta().to(dtype)
    return theta + 0.1 * torch.randn(theta.shape, generator=g, dtype=dtype)


def norms_of(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def test_n_params_of_the_paper_omniglot_learner() -> None:
    shape = LearnerShape(channels=1, image_size=28, n_way=5, filters=32)
    learner = Learner(shape)
    # by layer: 4 x (conv 3x3 weights + bias, BN scale + shift), then the linear head on the
    # 32 x 1 x 1 feature map (28 → 14 → 7 → 3 → 1)
    side = 28
    for _ in range(4):
        side //= 2
    assert side == 1 == feature_side(28)
    convs = (1 * 32 * 9 + 32) + 3 * (32 * 32 * 9 + 32)
    norms = 4 * (32 + 32)
    head = 32 * side * side * 5 + 5
    assert convs + norms + head == 28485
    assert learner.n_params == 28485 == learner.initial_theta().numel()
    assert learner.names == expected_names()


@pytest.mark.parametrize(
    "shape",
    [LearnerShape(1, 28, 5, 32), LearnerShape(3, 84, 5, 32), LearnerShape(1, 16, 3, 3)],
    ids=str,
)
def test_n_params_by_shape(shape: LearnerShape) -> None:
    c, f, n = shape.channels, shape.filters, shape.n_way
    side = feature_side(shape.image_size)
    expected = (c * f * 9 + f) + 3 * (f * f * 9 + f) + 4 * 2 * f + (f * side * side * n + n)
    assert Learner(shape).n_params == expected


def test_strided_learner_follows_finn_et_al() -> None:
    """Finn et al.'s Omniglot learner: stride-2 convolutions take 28 → 14 → 7 → 4 → 2 and the
    head reads the ``filters`` channels averaged over the last 2 x 2 map; 84 → 42 → 21 → 11 → 6."""
    shape = LearnerShape(channels=1, image_size=28, n_way=20, filters=64, downsample="stride")
    assert conv_sides(shape) == [14, 7, 4, 2] and feature_side(28, "stride") == 2
    assert feature_dim(shape) == 64
    convs = (1 * 64 * 9 + 64) + 3 * (64 * 64 * 9 + 64)
    assert Learner(shape).n_params == convs + 4 * 2 * 64 + 64 * 20 + 20
    color = LearnerShape(3, 84, 5, 32, "stride")
    assert conv_sides(color) == [42, 21, 11, 6] and feature_dim(color) == 32
    pooled = LearnerShape(1, 28, 20, 64)
    assert conv_sides(pooled) == [28, 14, 7, 3]
    # each convolution on a quarter of the pixels of the pooled learner's
    assert conv_flops(shape, 1) < conv_flops(pooled, 1) / 3.5
    with pytest.raises(ValueError, match="downsample"):
        Learner(LearnerShape(1, 28, 5, 8, downsample="dilate"))


def test_parameter_groups_cover_theta_exactly() -> None:
    learner = Learner(LearnerShape(1, 28, 5, 8))
    groups = learner.parameter_groups()
    assert [name for name, _ in groups] == learner.names == expected_names()
    covered = torch.zeros(learner.n_params, dtype=torch.int64)
    end = 0
    for (name, where), shape in zip(groups, learner.shapes):
        assert where.step is None
        assert where.start == end, f"{name} does not start where the previous group ended"
        assert where.stop - where.start == shape.numel() > 0
        covered[where] += 1
        end = where.stop
    assert end == learner.n_params
    assert covered.eq(1).all()  # every coordinate in exactly one group
    # and the slices pick exactly the unflattened tensors
    theta = torch.arange(learner.n_params, dtype=F64)
    views = learner.unflatten(theta)
    for name, where in groups:
        assert torch.equal(views[name].reshape(-1), theta[where]), name


def test_unflatten_views_share_memory_with_theta() -> None:
    learner = Learner(LearnerShape(1, 28, 5, 8))
    theta = learner.initial_theta().clone()
    views = learner.unflatten(theta)
    assert list(views) == learner.names
    storage = theta.untyped_storage().data_ptr()
    for (name, view), shape in zip(views.items(), learner.shapes):
        assert view.shape == shape, name
        assert view.untyped_storage().data_ptr() == storage, f"{name} is a copy"
    theta.mul_(0).add_(3.0)  # writes through θ are seen in every view ...
    assert all(v.eq(3.0).all() for v in views.values())
    views["head.bias"].fill_(-1.0)  # ... and writes through a view land in θ
    _, where = learner.parameter_groups()[-1]
    assert theta[where].eq(-1.0).all()
    assert theta[: where.start].eq(3.0).all()
    # gradients flow back to θ through the views
    theta.requires_grad_(True)
    loss = sum((i + 1) * v.sum() for i, v in enumerate(learner.unflatten(theta).values()))
    (grad,) = torch.autograd.grad(loss, theta)
    for i, (_, where) in enumerate(learner.parameter_groups()):
        assert grad[where].eq(i + 1).all()


def test_initial_theta_is_the_modules_parameters() -> None:
    torch.manual_seed(0)
    learner = Learner(LearnerShape(1, 28, 5, 8))
    theta = learner.initial_theta()
    flat = torch.cat([p.detach().reshape(-1) for p in learner.net.parameters()])
    assert torch.equal(theta, flat)
    assert not theta.requires_grad
    theta.add_(1.0)  # a copy or a detached view: the module's parameters must stay as they are
    torch.manual_seed(0)
    again = Learner(LearnerShape(1, 28, 5, 8)).initial_theta()
    assert torch.equal(learner.initial_theta(), again)


def test_fresh_batchnorm_state() -> None:
    learner = Learner(LearnerShape(1, 28, 5, 8))
    bn = learner.fresh_batchnorm_state(dtype=F64)
    assert set(bn) == {f"blocks.{i}.norm.running_{s}" for i in range(4) for s in ("mean", "var")}
    for name, value in bn.items():
        assert value.dtype == F64 and value.shape == (8,)
        assert value.eq(0.0 if name.endswith("mean") else 1.0).all()
    other = learner.fresh_batchnorm_state(dtype=F64)
    bn["blocks.0.norm.running_mean"].add_(1.0)  # each call gives new tensors
    assert other["blocks.0.norm.running_mean"].eq(0).all()
    assert learner.net.blocks[0].norm.running_mean.eq(0).all()


@pytest.mark.parametrize(
    ("momentum", "downsample"), [(0.9, "pool"), (0.3, "pool"), (0.9, "stride")]
)
def test_functional_call_matches_plain_modules(momentum: float, downsample: str) -> None:
    """Batch-statistics mode (and its running-statistics update) and running-statistics mode
    agree with nn.Conv2d/nn.BatchNorm2d in train and eval mode, and with ConvNet itself (with
    max-pools, or Finn et al.'s stride-2 convolutions and features averaged over space)."""
    shape = LearnerShape(channels=1, image_size=28, n_way=5, filters=8, downsample=downsample)
    learner = Learner(shape, bn_momentum=momentum, bn_eps=1e-3)
    theta = random_theta(learner, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 28, 28, generator=g, dtype=F64)
    x2 = torch.rand(4, 1, 28, 28, generator=g, dtype=F64)

    reference = reference_net(learner, theta, momentum, 1e-3).train()
    module = ConvNet(shape, momentum, 1e-3).to(F64)
    module.load_state_dict(learner.unflatten(theta), strict=False)
    bn = learner.fresh_batchnorm_state(dtype=F64)

    # batch statistics: same logits, same running statistics afterwards (twice, so the
    # momentum average is exercised from a non-fresh state)
    for batch in (x, x2):
        logits = learner(theta, batch, bn, batch_stats=True)
        assert logits.shape == (len(batch), 5)
        assert_close(logits, reference(batch), rtol=1e-10, atol=1e-12)
        assert_close(module(batch, batch_stats=True), logits, rtol=1e-10, atol=1e-12)
    for i, norm in enumerate(norms_of(reference)):
        assert_close(bn[f"blocks.{i}.norm.running_mean"], norm.running_mean, 1e-10, 1e-12)
        assert_close(bn[f"blocks.{i}.norm.running_var"], norm.running_var, 1e-10, 1e-12)
        assert_close(module.blocks[i].norm.running_var, norm.running_var, 1e-10, 1e-12)
        assert not norm.running_mean.eq(0).all()

    # running statistics: normalise with them, and leave them unchanged
    before = {k: v.clone() for k, v in bn.items()}
    reference.eval()
    logits = learner(theta, x2, bn, batch_stats=False)
    assert_close(logits, reference(x2), rtol=1e-10, atol=1e-12)
    assert_close(module(x2, batch_stats=False), logits, rtol=1e-10, atol=1e-12)
    for key, value in bn.items():
        assert torch.equal(value, before[key]), key
    # one image alone gets the same logits as in its batch
    assert_close(learner(theta, x2[1:2], bn, batch_stats=False), logits[1:2], 1e-10, 1e-12)
    # features are the head's input
    features = learner.features(theta, x2, bn, batch_stats=False)
    assert features.shape == (4, feature_dim(shape)) == (4, 8)  # 28 → 1 x 1 or 2 x 2 averaged
    w, b = learner.unflatten(theta)["head.weight"], learner.unflatten(theta)["head.bias"]
    assert_close(features @ w.T + b, logits, rtol=1e-10, atol=1e-12)


def test_functional_call_is_differentiable_in_theta() -> None:
    """The gradient w.r.t. the flat θ is the module's parameter gradients, concatenated."""
    shape = LearnerShape(channels=1, image_size=16, n_way=3, filters=4)
    learner = Learner(shape)
    theta = random_theta(learner, seed=3).requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(6, 1, 16, 16, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = nn.functional.cross_entropy(learner(theta, x, None, batch_stats=True), y)
    (grad,) = torch.autograd.grad(loss, theta)
    reference = reference_net(learner, theta, 0.9, 1e-5).train()
    nn.functional.cross_entropy(reference(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    assert_close(grad, expected, rtol=1e-9, atol=1e-12)
