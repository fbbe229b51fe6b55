"""Recipe options of the inner-loop methods (issue #18): θ_0's head built per episode
(``head_init``) and meta-training episodes with more ways than test episodes (``train_n_way``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import metalstm
from conftest import run_cli, small_config
from metalstm import (
    ConfigError,
    MetaLSTM,
    build_method,
    evaluate,
    inner_loop,
    load_method,
    override,
)
from metalstm import training as tr
from metalstm.checkpoint import save_checkpoint
from metalstm.data import Episode
from metalstm.inner_loop import AdaptedLearner, class_means
from metalstm.learner import Learner
from metalstm.methods.base import Method, learner_shape
from metalstm.methods.metalearner.ablation import sgd_from_learned_init
from metalstm.methods.pretraining import PretrainedClassifier
from metalstm.runfolder import CHECKPOINTS, METRICS
from metalstm.serialization import method_meta, method_tensors
from metalstm.training import Trainer
from test_metalearner import check_against_fd, double_model, random_episode
from test_training import synthetic_data, tiny_config  # noqa: F401 (synthetic_data: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_learner_reads_the_head_size_from_theta() -> None:
    cfg = small_config()  # 3-way
    learner = Learner(learner_shape(cfg))
    theta = learner.initial_theta()
    d = learner.shapes[-2][1]
    weight, bias = torch.randn(7, d), torch.randn(7)
    wide = learner.with_head(theta, weight, bias)
    assert wide.shape[0] == learner.n_body + 7 * (d + 1)
    x = torch.rand(4, 1, 16, 16)
    features = learner.features(theta, x)
    torch.testing.assert_close(learner(wide, x), features @ weight.T + bias)
    with pytest.raises(ValueError, match="does not fit"):
        learner(wide[:-1], x)


def test_prototype_head_makes_theta0_a_prototypical_network() -> None:
    """At θ_0 the logits are −||φ(x) − μ_k||² + ||φ(x)||²: ProtoNet's, up to a per-row constant."""
    cfg = small_config(head_init="prototypes")
    model = double_model(cfg)
    episode = random_episode(cfg, seed=3)
    theta0 = model.episode_theta0(model.cell.theta0, episode.support_x, episode.support_y)
    bn = model.learner.fresh_batchnorm_state(dtype=torch.float64)
    support = model.learner.features(model.cell.theta0, episode.support_x, bn)
    means = class_means(support, episode.support_y, cfg.n_way)
    query = model.learner.features(model.cell.theta0, episode.query_x, bn, batch_stats=False)
    logits = model.learner(theta0, episode.query_x, bn, batch_stats=False)
    proto = -(query.unsqueeze(1) - means.unsqueeze(0)).pow(2).sum(-1)
    torch.testing.assert_close(logits, proto + query.pow(2).sum(1, keepdim=True))
    # the body is c_0's; only the head is replaced
    torch.testing.assert_close(
        theta0[: model.learner.n_body], model.cell.theta0[: model.learner.n_body]
    )


def test_zero_head_starts_every_episode_at_uniform_predictions() -> None:
    cfg = small_config(head_init="zero")
    model = double_model(cfg)
    episode = random_episode(cfg, seed=4)
    theta0 = model.episode_theta0(model.cell.theta0, episode.support_x, episode.support_y)
    assert model.cell.theta0.shape == (model.learner.n_body,)  # c_0 is the body alone
    assert theta0.shape == (model.learner.n_params,)
    assert not theta0[model.learner.n_body :].any()


@pytest.mark.parametrize("method", ["lstm", "maml"])
def test_meta_gradient_through_the_prototype_head_matches_finite_differences(method: str) -> None:
    """Second order, float64: the meta-gradient reaches θ_0's body through the prototypes μ_k."""
    values = {"head_init": "prototypes", "second_order": True}
    if method == "maml":
        values = {"method": "maml", "head_init": "prototypes", "inner_lr": 0.1}
    cfg = override(small_config(), values)
    model = build_method(cfg).double()
    episode = random_episode(cfg, seed=5)

    def objective() -> torch.Tensor:
        return model.meta_loss(episode).loss

    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(objective(), list(params.values()))))
    theta0 = "cell.theta0" if method == "lstm" else "theta"
    n_body = model.learner.n_body
    assert grads[theta0][:n_body].abs().max() > 1e-6
    assert grads[theta0].shape == (n_body,)  # θ_0 has no head of its own: built per episode
    check_against_fd(model, objective, grads, seed=6, coords=1, per_tensor_direction=False)


@pytest.mark.usefixtures("synthetic_data")
def test_a_learned_head_cannot_meta_train_on_other_ways(tmp_path: Path) -> None:
    cfg = tiny_config(train_n_way=5)
    with pytest.raises(ConfigError, match="train_n_way=3 or head_init"):
        Trainer(cfg, tmp_path / "lstm", log=None)
    with pytest.raises(ConfigError, match="train_n_way=3"):
        Trainer(override(cfg, {"method": "maml"}), tmp_path / "maml", log=None)
    Trainer(override(cfg, {"head_init": "prototypes"}), tmp_path / "proto", log=None)
    Trainer(override(cfg, {"method": "protonet"}), tmp_path / "protonet", log=None)
    Trainer(override(cfg, {"method": "finetune"}), tmp_path / "finetune", log=None)  # batches
    build_method(cfg)  # a model is built for evaluation whatever it was trained on


def test_more_training_ways_than_test_ways(data_env: Path, tmp_path: Path) -> None:
    """Omniglot, meta-trained on 6-way 1-shot episodes, validated and tested on 3-way 2-shot
    ones."""
    cfg = small_config(
        image_size=28,
        train_n_way=6,
        train_k_shot=1,
        head_init="prototypes",
        episodes=4,
        val_interval=2,
        val_episodes=3,
        log_interval=1,
    )
    trainer = Trainer(cfg, tmp_path / "run", log=None)
    shapes = []
    meta_loss = trainer.method.meta_loss

    def spy(episode: Episode):  # type: ignore[no-untyped-def]
        shapes.append(torch.bincount(episode.support_y).tolist())
        return meta_loss(episode)

    trainer.method.meta_loss = spy  # type: ignore[method-assign]
    trainer.run()
    assert shapes == [[1] * 6] * 4
    model, _ = load_method(tmp_path / "run" / "best")
    assert model.config.train_ways == 6 and model.config.n_way == 3
    assert model.config.train_shots == 1 and model.config.k_shot == 2
    result = evaluate(model, episodes=5)
    assert len(result.accuracies) == 5
    assert result.protocol.k_shot == 2
    classifier = model.adapt(torch.rand(6, 1, 28, 28), torch.arange(3).repeat_interleave(2))
    assert isinstance(classifier, AdaptedLearner)
    assert classifier(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    # θ_0 has no head of its own, so the same weights serve any number of ways at test
    wide, _ = load_method(tmp_path / "run" / "best", n_way=5, k_shot=1)
    torch.testing.assert_close(wide.state_dict(), model.state_dict())
    assert wide.predict(
        torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(4, 1, 28, 28)
    ).shape == (4, 5)
    assert len(evaluate(wide, episodes=2).accuracies) == 2
    argv = ["evaluate", "--checkpoint", str(tmp_path / "run"), "--episodes", "2", "--n-way", "5"]
    code, out, err = run_cli([*argv, "--k-shot", "2"])
    assert code == 0 and "5-way 2-shot" in out, err


@pytest.mark.usefixtures("synthetic_data")
def test_pretrained_body_is_trained_first_in_the_same_run_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init_body=pretrained: RUN/pretrain is a finished classifier run whose body c_0 starts
    from; a run killed before its first meta-update reuses it instead of pre-training again."""
    cfg = tiny_config(episodes=2, val_interval=2, init_body="pretrained", pretrain_epochs=1.0)
    starts: list[torch.Tensor] = []
    start_from = MetaLSTM.start_from

    def spy(self: MetaLSTM, trained: Method) -> None:
        start_from(self, trained)
        starts.append(self.theta0.detach().clone())

    monkeypatch.setattr(MetaLSTM, "start_from", spy)
    run = tmp_path / "run"
    first = metalstm.train(cfg, run, log=None)
    phase, _ = load_method(run / "pretrain" / "last")
    assert isinstance(phase, PretrainedClassifier) and phase.config.settings.pretrain_epochs == 1.0
    n_body = first.method.learner.n_body
    torch.testing.assert_close(starts[0][:n_body], phase.body(), rtol=0, atol=0)
    # meta-training then moved c_0 away from the pre-trained body
    assert not torch.equal(first.method.theta0.detach()[:n_body], phase.body())

    rows = (run / "pretrain" / "metrics.jsonl").read_text()
    for name in (*CHECKPOINTS, METRICS):
        (run / name).unlink(missing_ok=True)  # as if killed before meta-training's first save
    again = tr.resume(run, log=None)
    assert (run / "pretrain" / "metrics.jsonl").read_text() == rows  # reused, not re-run
    torch.testing.assert_close(starts[1], starts[0], rtol=0, atol=0)
    torch.testing.assert_close(again.method.state_dict(), first.method.state_dict())

    metalstm.train(override(cfg, {"init_body": "random"}), run, force=True, log=None)
    assert not (run / "pretrain").exists()  # a new run does not inherit an old pre-training


def episode_end_statistics(model: MetaLSTM, episode: Episode) -> dict[str, torch.Tensor]:
    """The running statistics a meta-training episode ends with: support passes, then the query
    pass with its batch statistics (what ``query_bn=meta`` accumulates)."""
    with torch.no_grad():
        result = model.inner_loop(episode.support_x, episode.support_y, model.settings.inner_steps)
        model.learner(result.theta, episode.query_x, result.bn, batch_stats=True)
    return result.bn


def test_meta_batchnorm_averages_the_statistics_episodes_end_with() -> None:
    """``query_bn=meta``: a plain mean over the first 1/rate episodes, then an EMA of that rate;
    at test the queries are normalised with them, one query independent of the others."""
    cfg = small_config(query_bn="meta", meta_bn_rate=0.4)
    model = double_model(cfg)
    episodes = [random_episode(cfg, seed) for seed in (11, 12, 13)]
    ends = [episode_end_statistics(model, episode) for episode in episodes]
    for episode in episodes:
        model.meta_loss(episode)
    assert int(model.meta_bn_episodes) == 3
    stats = model.meta_batchnorm()
    for name, value in stats.items():
        mean_of_two = (ends[0][name] + ends[1][name]) / 2  # rates 1, 1/2
        torch.testing.assert_close(value, 0.6 * mean_of_two + 0.4 * ends[2][name])  # rate 0.4
        assert not torch.allclose(value, ends[2][name])
    test = random_episode(cfg, seed=14)
    classifier = model.adapt(test.support_x, test.support_y)
    assert isinstance(classifier, AdaptedLearner)
    logits = classifier(test.query_x)
    alone = torch.cat([classifier(x[None]) for x in test.query_x])
    torch.testing.assert_close(logits, alone)  # no statistics of the query batch
    torch.testing.assert_close(
        logits, model.learner(classifier.theta, test.query_x, stats, batch_stats=False)
    )
    support_mode = override(cfg, {"query_bn": "support"})
    assert model.test_batchnorm() == "meta-training statistics"
    assert build_method(support_mode).test_batchnorm() == "support statistics"
    with pytest.raises(ConfigError, match="train_query_bn"):
        override(cfg, {"query_bn": "support", "train_query_bn": "meta"})


@pytest.mark.parametrize("momentum", [1.0, 0.5])
def test_final_support_pass_normalises_the_queries_with_the_support_set_at_theta_t(
    momentum: float,
) -> None:
    """``query_bn=final``: after the T updates one more support pass, at θ_T, folds the support
    set's statistics there into the running ones (BN momentum as every pass; with 1 they are
    exactly θ_T's); the queries are normalised with them, one query independent of the others,
    and the protocol line says so. ``support`` keeps those of the passes at θ_0..θ_{T-1}."""
    cfg = small_config(head_init="prototypes", query_bn="final", bn_momentum=momentum)
    model = double_model(cfg)
    episode = random_episode(cfg, seed=21)
    with torch.no_grad():
        result = model.inner_loop(episode.support_x, episode.support_y, model.settings.eval_steps)
    before = {name: value.clone() for name, value in result.bn.items()}
    at_theta_t = model.learner.fresh_batchnorm_state(dtype=torch.float64)
    model.learner(result.theta, episode.support_x, at_theta_t, batch_stats=True)  # momentum m:
    fresh = model.learner.fresh_batchnorm_state(dtype=torch.float64)  # m · s + (1 − m) · fresh
    classifier = model.adapt(episode.support_x, episode.support_y)
    assert isinstance(classifier, AdaptedLearner)
    torch.testing.assert_close(classifier.theta, result.theta)
    for name, value in classifier.bn.items():
        batch = (at_theta_t[name] - (1 - momentum) * fresh[name]) / momentum  # θ_T's statistics
        torch.testing.assert_close(value, (1 - momentum) * before[name] + momentum * batch)
        assert not torch.allclose(value, before[name])
    logits = classifier(episode.query_x)
    alone = torch.cat([classifier(x[None]) for x in episode.query_x])
    torch.testing.assert_close(logits, alone)  # no statistics of the query batch
    assert model.test_batchnorm() == "support statistics at θ_T"
    support = double_model(override(cfg, {"query_bn": "support"}))
    support.load_state_dict(model.state_dict())
    support_classifier = support.adapt(episode.support_x, episode.support_y)
    assert isinstance(support_classifier, AdaptedLearner)
    for name, value in support_classifier.bn.items():
        torch.testing.assert_close(value, before[name].to(value))
    assert support.test_batchnorm() == "support statistics"


@pytest.mark.parametrize("query_bn", ["support", "final"])
def test_transductive_evaluation_runs_no_extra_support_pass(
    query_bn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With transductive batch norm the queries normalise with their own statistics: ``final``
    costs no pass at θ_T, and gives the same logits as ``support``."""
    cfg = small_config(head_init="prototypes", query_bn=query_bn, transductive=True)
    model = double_model(cfg)
    episode = random_episode(cfg, seed=22)
    reference = model.adapt(episode.support_x, episode.support_y)(episode.query_x)

    def no_pass(*args: object) -> None:
        raise AssertionError("a support pass at θ_T under transductive batch norm")

    monkeypatch.setattr(inner_loop, "final_support_pass", no_pass)
    classifier = model.adapt(episode.support_x, episode.support_y)
    torch.testing.assert_close(classifier(episode.query_x), reference)
    other = double_model(
        override(cfg, {"query_bn": "final" if query_bn == "support" else "support"})
    )
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        other.adapt(episode.support_x, episode.support_y)(episode.query_x), reference
    )


def test_final_support_pass_from_the_command_line(data_env: Path, tmp_path: Path) -> None:
    """``evaluate --query-bn final`` on a shipped meta-learner: the protocol line names the mode;
    the SGD ablation of a ``final`` model normalises the same way."""
    code, out, err = run_cli(
        [
            "evaluate",
            "--checkpoint",
            "omniglot-5w1s-paper",
            "--episodes",
            "2",
            "--query-bn",
            "final",
            "--quiet",
        ]
    )
    assert code == 0, err
    assert "BN: support statistics at θ_T" in out
    model, _ = load_method("omniglot-5w1s-paper", query_bn="final")
    ablation = sgd_from_learned_init(model, [1e-9])
    assert evaluate(ablation.model, episodes=2).protocol.bn_mode == "support statistics at θ_T"
    # a method without an inner loop has one θ, so nothing to choose: a one-line refusal
    protonet = build_method(override(small_config(image_size=28), {"method": "protonet"}))
    path = save_checkpoint(
        tmp_path / "protonet", method_tensors(protonet), method_meta(protonet, "t")
    )
    code, out, err = run_cli(["evaluate", "--checkpoint", str(path), "--query-bn", "final"])
    assert code == 2 and err.count("\n") == 1 and "--query-bn applies to" in err, err


def test_meta_batchnorm_through_training_checkpoints_and_the_sgd_ablation(
    data_env: Path, tmp_path: Path
) -> None:
    """Omniglot: a run with ``query_bn=meta`` and the test's normalisation while meta-training
    (``train_query_bn=meta``) saves the accumulated statistics in its checkpoints; evaluation and
    the SGD ablation normalise with them and say so."""
    cfg = small_config(
        image_size=28,
        head_init="prototypes",
        query_bn="meta",
        train_query_bn="meta",
        episodes=4,
        val_interval=2,
        val_episodes=3,
        log_interval=1,
    )
    trainer = Trainer(cfg, tmp_path / "run", log=None)
    trainer.run()
    assert int(trainer.method.meta_bn_episodes) == 4
    model, _ = load_method(tmp_path / "run" / "last")
    assert isinstance(model, MetaLSTM)
    for name, value in model.meta_batchnorm().items():
        torch.testing.assert_close(value, trainer.method.meta_batchnorm()[name])
    assert evaluate(model, episodes=3).protocol.bn_mode == "meta-training statistics"
    ablation = sgd_from_learned_init(model, [1e-9])
    assert evaluate(ablation.model, episodes=3).protocol.bn_mode == "meta-training statistics"
