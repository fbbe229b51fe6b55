"""The comparison methods: interface, MAML's meta-gradient, prototypes, nearest neighbour, matching
attention, pre-training batches, fine-tuning grid, and a short real training of every method."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
from metalstm import Config, build_method, load_method
from metalstm.checkpoint import save_checkpoint
from metalstm.config import load_preset, override, with_recipe
from metalstm.data import ClassImages, Episode
from metalstm.data.batches import ClassBatches
from metalstm.errors import ConfigError
from metalstm.evaluation import evaluate, protocol_for
from metalstm.methods.base import Adapter
from metalstm.methods.finetune import Finetune
from metalstm.methods.maml import MAML
from metalstm.methods.matching import MatchingNetFCE, attention_probabilities
from metalstm.methods.metric import nearest_neighbour_logits
from metalstm.methods.pretraining import PretrainedClassifier
from metalstm.methods.protonet import ProtoNet, prototypes
from metalstm.registry import TrainsOn, method_entry, method_names
from metalstm.serialization import method_meta, method_tensors
from metalstm.training import Trainer, train

TINY = small_config(inner_steps=2)
# The pre-trained baselines' own settings, given to every method (the others skip them).
TINY_SETTINGS = {"pretrain_classes": 7, "finetune_lr_grid": "0.1", "finetune_steps_grid": "3"}


pytestmark = pytest.mark.usefixtures("one_thread")


METHODS = method_names()  # the built-in methods, in table order


def tiny(name: str, **values: object) -> Config:
    # Keys of other methods' settings are skipped, so one set of values serves every method.
    return override(TINY, {"method": name, **TINY_SETTINGS, **values}, strict=False)


def random_episode(config: Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    n, k, q, s = config.n_way, config.k_shot, config.q_query, config.image_size
    shape = (config.channels, s, s)
    return Episode(
        support_x=torch.rand(n * k, *shape, generator=g, dtype=dtype),
        support_y=torch.arange(n).repeat_interleave(k),
        query_x=torch.rand(n * q, *shape, generator=g, dtype=dtype),
        query_y=torch.arange(n).repeat_interleave(q),
        classes=torch.arange(n),
        support_ids=torch.arange(n * k),
        query_ids=torch.arange(n * q),
    )


# -- the interface -------------------------------------------------------------------------------
def test_every_method_is_registered_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    assert set(METHODS) <= set(method_names())
    episode = random_episode(TINY)
    for name in METHODS:
        model = build_method(tiny(name))
        assert model.name == name
        logits = model.predict(episode.support_x, episode.support_y, episode.query_x)
        assert logits.shape == (TINY.n_way * TINY.q_query, TINY.n_way)
        assert torch.isfinite(logits).all()
        path = save_checkpoint(tmp_path / name, method_tensors(model), method_meta(model, "test"))
        loaded, meta = load_method(path)
        assert type(loaded) is type(model) and meta["algorithm"] == name
        again = loaded.predict(episode.support_x, episode.support_y, episode.query_x)
        assert torch.allclose(again, logits, atol=1e-6), name


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ("lstm", "3-way 2-shot, 2 queries per class, T = 4, BN: support statistics, "),
        ("maml", "2 queries per class, α = 0.5, 2 steps (4 at test), BN: support statistics, "),
        ("finetune", "SGD lr 0.1, 3 steps (chosen on validation), BN: pre-training statistics"),
        ("nn-embedding", "2 queries per class, BN: pre-training statistics, "),
        ("nn-pixel", "2 queries per class, BN: none, "),
        ("protonet", "2 queries per class, BN: transductive, "),
        ("matching-fce", "2 queries per class, K = 2, BN: support statistics, "),
    ],
)
def test_protocol_line_states_each_methods_own_test_time_settings(name: str, protocol: str) -> None:
    transductive = name == "protonet"
    config = tiny(
        name, eval_inner_steps=4, maml_inner_lr=0.5, fce_steps=2, transductive=transductive
    )
    algorithm = build_method(config)
    described = protocol_for(algorithm, algorithm.config, "test", 10, 3).describe()
    assert described.startswith("omniglot/vinyals test, 3-way 2-shot, ")
    assert protocol in described and described.endswith("episodes seed 3")
    if name not in ("lstm", "maml"):  # no T to state for the others
        assert "T = " not in described


def test_meta_loss_is_differentiable_for_episodic_methods() -> None:
    episode = random_episode(TINY)
    for name in METHODS:
        model = build_method(tiny(name))
        if method_entry(name).trains_on is not TrainsOn.EPISODES:
            continue
        out = model.meta_loss(episode)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
        assert 0.0 <= out.accuracy <= 1.0


def test_trains_on_says_how_each_method_is_trained() -> None:
    kinds = {name: method_entry(name).trains_on for name in METHODS}
    assert kinds["nn-pixel"] is TrainsOn.NOTHING
    assert kinds["finetune"] is kinds["nn-embedding"] is TrainsOn.BATCHES
    assert {kinds[m] for m in ("lstm", "maml", "maml-fo", "matching", "matching-fce")} == {
        TrainsOn.EPISODES
    }
    assert build_method(tiny("nn-pixel")).device == torch.device("cpu")  # no parameters


# -- MAML ----------------------------------------------------------------------------------------
def maml_setup(name: str, downsample: str = "pool") -> tuple[MAML, Episode]:
    config = tiny(
        name, k_shot=2, q_query=2, inner_steps=2, maml_inner_lr=0.5, downsample=downsample
    )
    model = build_method(config).double()
    assert isinstance(model, MAML)
    return model, random_episode(config, seed=1, dtype=torch.float64)


def loss_at(model: MAML, episode: Episode, theta: torch.Tensor) -> float:
    with torch.no_grad():
        saved = model.theta.detach().clone()
        model.theta.copy_(theta)
        try:
            return float(model.meta_loss(episode).loss)
        finally:
            model.theta.copy_(saved)


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_maml_second_order_meta_gradient_matches_finite_differences(downsample: str) -> None:
    model, episode = maml_setup("maml", downsample)
    (grad,) = torch.autograd.grad(model.meta_loss(episode).loss, model.theta)
    theta = model.theta.detach().clone()
    g = torch.Generator().manual_seed(2)
    eps = 1e-6
    directions = [torch.randn(theta.shape, generator=g, dtype=torch.float64) for _ in range(3)]
    for i in torch.randperm(theta.numel(), generator=g)[:4].tolist():  # single coordinates too
        e = torch.zeros_like(theta)
        e[i] = 1.0
        directions.append(e)
    for v in directions:
        fd = (
            loss_at(model, episode, theta + eps * v) - loss_at(model, episode, theta - eps * v)
        ) / (2 * eps)
        assert float(grad @ v) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_first_order_maml_is_the_query_gradient_at_the_adapted_parameters() -> None:
    model, episode = maml_setup("maml-fo")
    (grad,) = torch.autograd.grad(model.meta_loss(episode).loss, model.theta)
    # Definition of first-order MAML: ∇θ' L_query(θ') at θ' = θ_T, inner gradients constant.
    with torch.no_grad():
        theta_t = model.inner_loop(episode.support_x, episode.support_y, 2).theta
    at = theta_t.detach().requires_grad_(True)
    bn = model.learner.fresh_batchnorm_state(dtype=torch.float64)  # query: batch statistics
    query_loss = F.cross_entropy(
        model.learner(at, episode.query_x, bn, batch_stats=True), episode.query_y
    )
    (expected,) = torch.autograd.grad(query_loss, at)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12)
    # ... which is not the true gradient: second order matters here.
    second, _ = maml_setup("maml")
    (exact,) = torch.autograd.grad(second.meta_loss(episode).loss, second.theta)
    assert (exact - grad).norm() > 1e-3 * exact.norm()


def test_maml_adapts_without_building_a_graph() -> None:
    model = build_method(tiny("maml"))
    episode = random_episode(TINY)
    classifier = model.adapt(episode.support_x, episode.support_y)
    assert not classifier.theta.requires_grad  # type: ignore[attr-defined]
    assert not torch.equal(classifier.theta, model.theta.detach())  # type: ignore[attr-defined]


# -- Prototypical Networks -----------------------------------------------------------------------
def test_prototypes_are_class_means_of_the_embeddings() -> None:
    config = tiny("protonet", k_shot=3, q_query=2)
    model = build_method(config)
    assert isinstance(model, ProtoNet)
    episode = random_episode(config, seed=3)
    perm = torch.randperm(len(episode.support_y), generator=torch.Generator().manual_seed(0))
    sx, sy = episode.support_x[perm], episode.support_y[perm]  # labels in any order
    bn = model.learner.fresh_batchnorm_state()
    with torch.no_grad():
        z = model.learner.features(model.theta, sx, bn, batch_stats=True)
        zq = model.learner.features(model.theta, episode.query_x, bn, batch_stats=False)
    protos = prototypes(z, sy, config.n_way)
    for c in range(config.n_way):
        assert torch.allclose(protos[c], z[sy == c].mean(0), atol=1e-6)
    expected = -torch.cdist(zq, protos).pow(2)
    logits = model.predict(sx, sy, episode.query_x)  # support statistics for the query
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)


# -- nearest neighbour ---------------------------------------------------------------------------
def test_nearest_neighbour_on_a_hand_made_case() -> None:
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [3.0, 0.1]])
    support_y = torch.tensor([0, 1, 2, 0])
    query = torch.tensor([[10.0, 0.5], [0.1, 0.2], [-0.5, -0.4], [0.05, -1.0]])
    logits = nearest_neighbour_logits(support, support_y, query, 3)
    assert logits.argmax(1).tolist() == [0, 1, 2, 2]
    # Cosine: the scale of a vector does not matter; each class keeps its best match.
    assert torch.allclose(logits, nearest_neighbour_logits(5 * support, support_y, query, 3))
    best_zero = max(F.cosine_similarity(query[0], support[i], dim=0) for i in (0, 3))
    assert logits[0, 0] == pytest.approx(float(best_zero), abs=1e-6)


def test_pixel_nearest_neighbour_labels_copies_of_the_support_images() -> None:
    config = tiny("nn-pixel", n_way=3, k_shot=1)
    model = build_method(config)
    support = torch.zeros(3, 1, 16, 16)
    support[0, :, :8] = 1.0  # top half
    support[1, :, :, :8] = 1.0  # left half
    support[2, :, 4:12, 4:12] = 1.0  # centre square
    labels = torch.tensor([2, 0, 1])  # labels need not follow the row order
    query = torch.stack([0.5 * support[1], support[2], 0.9 * support[0]])
    query[:, :, 0, 15] += 0.1  # a little noise
    assert model.predict(support, labels, query).argmax(1).tolist() == [0, 1, 2]


# -- Matching Networks ---------------------------------------------------------------------------
def test_matching_attention_is_a_distribution_over_the_support_labels() -> None:
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    support_y = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = attention_probabilities(query, support, support_y, 2)
    assert torch.allclose(p.sum(1), torch.ones(2))
    a = torch.softmax(torch.tensor([1.0, 0.0, 0.0]), 0)  # cosine of query 0 with each support
    assert p[0, 0] == pytest.approx(float(a[0]))
    assert p[1, 1] == pytest.approx(
        float(torch.softmax(torch.tensor([0.0, 1.0, 1.0]), 0)[1:].sum())
    )


def test_full_context_embeddings_depend_on_the_whole_support_set() -> None:
    model = build_method(tiny("matching-fce"))
    assert isinstance(model, MatchingNetFCE)
    g = torch.Generator().manual_seed(0)
    support = torch.randn(6, model.embedding_dim, generator=g)
    query = torch.randn(4, model.embedding_dim, generator=g)
    y = torch.arange(3).repeat_interleave(2)
    base = model.logits(support, y, query)
    changed = support.clone()
    changed[5] += 1.0  # another support example of class 2 only
    assert not torch.allclose(model.logits(changed, y, query)[:, :2], base[:, :2])
    assert torch.allclose(base.exp().sum(1), torch.ones(4), atol=1e-5)


# -- pre-training --------------------------------------------------------------------------------
def small_classes(counts: list[int]) -> ClassImages:
    images = torch.arange(sum(counts), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return ClassImages.from_counts(
        images.contiguous(), counts, [f"c{i}" for i in range(len(counts))]
    )


def test_class_batches_visit_every_image_once_per_epoch_deterministically() -> None:
    data = small_classes([3, 5, 4])  # image value = its row
    batches = ClassBatches(data, batch_size=4, seed=7)
    assert batches.steps_per_epoch == 3 and batches.steps(2.0) == 6 and batches.steps(0.01) == 1
    seen = []
    for step in range(3):
        x, y = batches.batch(step)
        rows = (x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(y, torch.bucketize(rows, data.class_start, right=True) - 1)
        seen += rows.tolist()
    assert sorted(seen) == list(range(12))
    again = ClassBatches(data, batch_size=4, seed=7)
    assert torch.equal(again.batch(4)[0], batches.batch(4)[0])  # pure in (seed, step)
    halves = [batches.batch(5, rank, 2)[1] for rank in range(2)]
    assert torch.equal(torch.cat(halves), batches.batch(5)[1])
    with pytest.raises(ConfigError):
        ClassBatches(data, batch_size=13, seed=0)


def test_pretrained_classifier_needs_and_checks_its_number_of_classes() -> None:
    with pytest.raises(ConfigError, match="pretrain_classes"):
        build_method(tiny("finetune", pretrain_classes=0))
    data = small_classes([2, 2, 2])
    cls = method_entry("finetune").cls
    configured = cls.configure(tiny("finetune", pretrain_classes=0), data)
    assert configured.settings.pretrain_classes == 3
    with pytest.raises(ConfigError, match="3 classes"):
        cls.configure(tiny("finetune", pretrain_classes=7), data)
    with pytest.raises(ConfigError, match="finetune_lr_grid"):
        build_method(tiny("finetune", finetune_lr_grid="fast"))


def test_batch_loss_trains_the_c_way_classifier_and_its_running_statistics() -> None:
    model = build_method(tiny("finetune"))
    assert isinstance(model, PretrainedClassifier)
    before = {k: v.clone() for k, v in model.bn_state().items()}
    x, y = torch.rand(8, 1, 16, 16), torch.arange(8) % 7
    out = model.batch_loss(x, y)
    out.loss.backward()
    assert model.theta.grad is not None and model.theta.grad.abs().sum() > 0
    assert any(not torch.equal(before[k], v) for k, v in model.bn_state().items())


def test_finetune_starts_from_the_pretrained_body_with_a_new_zero_head() -> None:
    model = build_method(tiny("finetune"))
    assert isinstance(model, Finetune)
    episode = random_episode(TINY)
    theta = model.fine_tune(episode.support_x, episode.support_y, lr=0.1, steps=0)
    assert torch.equal(theta[: model.n_body], model.theta.detach()[: model.n_body])
    assert not theta[model.n_body :].any() and theta.numel() == model.learner.n_params
    tuned = model.fine_tune(episode.support_x, episode.support_y, lr=0.1, steps=3)
    loss = [
        F.cross_entropy(
            model.learner(t, episode.support_x, model.bn_state(), False), episode.support_y
        )
        for t in (theta, tuned)
    ]
    assert loss[1] < loss[0]


def test_finetune_scores_its_whole_grid_in_one_pass_and_keeps_the_best(tmp_path: Path) -> None:
    model = build_method(
        tiny("finetune", finetune_lr_grid="0.01,0.1,1", finetune_steps_grid="5,1,20")
    )
    assert isinstance(model, Finetune)
    grid = [(lr, steps) for lr in (0.01, 0.1, 1.0) for steps in (5, 1, 20)]
    episode = random_episode(model.config)
    calls = []

    def score(adapt: Adapter) -> list[float]:  # stands in for the Trainer's validation episodes
        calls.append(adapt)
        classifiers = adapt(episode.support_x, episode.support_y)
        assert len(classifiers) == len(grid)
        for classifier, (lr, steps) in zip(classifiers, grid):
            # One fine-tuning run per learning rate; its prefixes are the shorter step counts.
            theta = model.fine_tune(episode.support_x, episode.support_y, lr, steps)
            alone = model.classifier(theta)
            assert torch.equal(classifier(episode.query_x), alone(episode.query_x)), (lr, steps)
        return [0.9 if (lr, steps) in ((0.1, 20), (1.0, 5)) else 0.5 for lr, steps in grid]

    assert model.validate(score) == 0.9
    assert len(calls) == 1  # one pass over the validation episodes
    # A tie goes to the first setting in grid order.
    assert float(model.finetune_lr) == pytest.approx(0.1) and int(model.finetune_steps) == 20
    path = save_checkpoint(tmp_path / "ft", method_tensors(model), method_meta(model, "t"))
    loaded, _ = load_method(path)  # the choice travels with the checkpoint
    assert int(loaded.get_buffer("finetune_steps")) == 20


# -- a short real training of every method -------------------------------------------------------
SHORT = {  # per method: a few seconds of training on 2 shared cores
    "lstm": {"episodes": 60, "inner_steps": 5},
    "finetune": {"pretrain_epochs": 0.1, "finetune_lr_grid": "0.01", "finetune_steps_grid": "10"},
    "nn-embedding": {"pretrain_epochs": 0.1},
    "matching": {"episodes": 100},
    "matching-fce": {"episodes": 100},
    # 50 updates: the recipe's Adam 1e-3 (Finn et al.'s, for 60,000 updates) moves θ_0 little in
    # so few (46 % on the model-207 AVX-512 Xeon); 1e-2 reaches 57 % there
    "maml": {"episodes": 100, "meta_batch": 2, "lr": 0.01},
    "maml-fo": {"episodes": 100, "meta_batch": 2},
    "protonet": {"episodes": 100},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_beats_chance_after_a_short_training(
    method: str, data_env: Path, tmp_path: Path
) -> None:
    # as compare and train --method build it: the method's own settings, not the preset's
    config = with_recipe(load_preset("omniglot-5w1s"), method)
    config = override(
        config,
        {
            "filters": 16,
            "q_query": 5,
            "val_episodes": 10,
            "val_interval": 10_000,  # validate (and save best) at the end only
            "device": "cpu",
            **SHORT.get(method, {}),
        },
    )
    start = time.perf_counter()
    if method == "nn-pixel":
        model = build_method(config)
        with pytest.raises(ConfigError, match="nothing to train"):
            Trainer(config, tmp_path)
    else:
        train(config, tmp_path, log=None)
        model, _ = load_method(tmp_path / "best")
    result = evaluate(model, episodes=20)
    chance = 1 / config.n_way
    print(f"{method}: {result.line()} in {time.perf_counter() - start:.1f} s")
    assert result.mean > chance + 0.08 and result.mean - result.ci95 > chance, result.line()
