"""A batch of episodes runs as one pass of the learner and computes what each episode alone does.

``Config.episode_batch`` E stacks E episodes (θ [E, n], images [E, B, C, H, W]) into grouped
convolutions with each episode's channels as one group, so batch norm's statistics stay per
episode. In float64 every figure must equal the one-episode path's to rounding: the learner's
logits and statistics, the meta-learner's and MAML's meta-gradients (second order included), the
adapted classifiers; in float32 an evaluation scores the same queries. Batches of episodes keep
evaluation independent of the number of processes (blocks of episodes per rank).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from metalstm import build_method, layers, load_method, load_preset, override
from metalstm.bench import add_bench_arguments, bench_main
from metalstm.config import Config
from metalstm.data import Episode, Episodes, EpisodeSampler, load_split
from metalstm.distributed import Distributed, episode_shard
from metalstm.errors import ConfigError
from metalstm.evaluation import evaluate
from metalstm.learner import Learner, LearnerShape
from metalstm.methods.base import Method
from metalstm.training import episode_items

F64 = torch.float64


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("downsample", ["pool", "stride"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_a_batched_pass_is_each_episodes_pass(downsample: str, batch_stats: bool) -> None:
    torch.manual_seed(0)
    learner = Learner(LearnerShape(1, 28, 5, 8, downsample))
    episodes, images = 3, 5
    theta = learner.initial_theta().to(F64) + 0.05 * torch.randn(
        episodes, learner.n_params, dtype=F64
    )
    theta.requires_grad_(True)
    x = torch.rand(episodes, images, 1, 28, 28, dtype=F64)
    y = torch.randint(0, 5, (episodes, images))
    bn = learner.fresh_batchnorm_state(dtype=F64, episodes=episodes)
    for value in bn.values():  # statistics of earlier support passes, different per episode
        value.uniform_(0.5, 1.5)
    given = {k: v.clone() for k, v in bn.items()}
    logits = learner(theta, x, bn, batch_stats=batch_stats)  # [E, B, N]
    losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), theta)
    assert logits.shape == (episodes, images, 5)
    for e in range(episodes):
        alone = {k: v.view(episodes, -1)[e].clone() for k, v in given.items()}
        theta_e = theta[e].detach().requires_grad_(True)
        logits_e = learner(theta_e, x[e], alone, batch_stats=batch_stats)
        (grad_e,) = torch.autograd.grad(F.cross_entropy(logits_e, y[e], reduction="sum"), theta_e)
        close(logits[e], logits_e)
        close(grad[e], grad_e)
        for name, value in alone.items():  # the running statistics each episode's pass left
            close(bn[name].view(episodes, -1)[e], value)
    features = learner.features(theta.detach(), x)  # [E, B, D]
    close(features[1], learner.features(theta[1].detach(), x[1]))


def test_a_batched_pass_refuses_images_of_one_episode() -> None:
    learner = Learner(LearnerShape(1, 28, 5, 8))
    theta = learner.initial_theta().expand(2, -1)
    with pytest.raises(ValueError, match=r"θ of 2 episodes takes images \[E, B, C, H, W\]"):
        learner(theta, torch.rand(5, 1, 28, 28))


def omniglot_episodes(config: Config, count: int, dtype: torch.dtype) -> list[Episode]:
    data = load_split("omniglot", config.split, "test", image_size=28, channels=1)
    sampler = EpisodeSampler(data, config.n_way, config.k_shot, config.q_query, seed=3)
    episodes = [sampler.episode(step=i) for i in range(count)]
    return [
        replace(e, support_x=e.support_x.to(dtype), query_x=e.query_x.to(dtype)) for e in episodes
    ]


def gradient(method: Method) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in method.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    ("preset", "changes"),
    [
        # the shipped recipe: head from the support set's prototypes, queries at θ_T's statistics
        ("omniglot-5w1s", {"settings": {"inner_steps": 2}}),
        # the paper's: a learned head, the support passes' statistics
        ("omniglot-5w1s-paper", {"settings": {"inner_steps": 3}}),
        # second-order MAML on Finn et al.'s strided learner, and first order
        ("omniglot-5w5s", {"method": "maml", "downsample": "stride"}),
        ("omniglot-5w1s", {"method": "maml-fo", "settings": {"inner_steps": 2, "inner_lr": 0.1}}),
    ],
)
def test_a_batch_of_episodes_meta_trains_and_adapts_as_each_episode(
    data_env: Path, preset: str, changes: dict[str, object]
) -> None:
    base = {"filters": 8, "q_query": 2, "n_way": 5, "train_n_way": None}
    config = override(load_preset(preset), {**base, **changes})
    torch.manual_seed(0)
    method = build_method(config).to(F64)
    assert method.batches_episodes()
    episodes = omniglot_episodes(config, 3, F64)
    batch = Episodes.stack(episodes)

    out = method.meta_loss(batch)
    out.loss.backward()
    batched = gradient(method)
    method.zero_grad(set_to_none=True)
    losses, accuracies = [], []
    for episode in episodes:
        single = method.meta_loss(episode)
        single.loss.backward()  # gradients add up over the episodes
        losses.append(single.loss.detach())
        accuracies.append(single.accuracy)
    close(out.loss.detach(), torch.stack(losses).sum())
    assert out.accuracy == pytest.approx(sum(accuracies))
    close(batched, gradient(method))

    classifier = method.adapt(batch.support_x, batch.support_y)
    with torch.no_grad():
        logits = classifier(batch.query_x)  # [E, N*Q, N]
        for e, episode in enumerate(episodes):
            close(logits[e], method.adapt(episode.support_x, episode.support_y)(episode.query_x))


def test_evaluation_in_batches_scores_every_episode_as_alone(data_env: Path) -> None:
    """The shipped meta-learner on 10 test episodes, 4 at a time (4 + 4 + 2): float32 rounding
    differs, so a near tie may flip a query or two (on all 600 test episodes, batches of 8 on
    the AVX-512 Xeon: one episode 2 queries of 75 apart), the rest are the same."""
    method, _ = load_method("omniglot-5w1s")
    one = evaluate(method, episodes=10)
    method.config = override(method.config, {"episode_batch": 4})
    four = evaluate(method, episodes=10)
    assert len(four.accuracies) == 10
    differences = [abs(a - b) for a, b in zip(one.accuracies, four.accuracies)]
    assert max(differences) <= 3 / 75 + 1e-9 and sum(d > 0 for d in differences) <= 2
    assert one.protocol == four.protocol


@pytest.mark.parametrize("block", [1, 2, 4])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_take_whole_batches_and_every_episode_once(block: int, world_size: int) -> None:
    for total in range(12):
        shards = [episode_shard(total, block, rank, world_size) for rank in range(world_size)]
        assert sorted(i for shard in shards for i in shard) == list(range(total))
        for rank, shard in enumerate(shards):  # blocks b ≡ rank (mod world size), kept whole
            assert all((i // block) % world_size == rank for i in shard)
        assert Distributed.single().shard_episodes(total, block) == list(range(total))


def test_trainer_items_are_batches_where_the_method_takes_them(data_env: Path) -> None:
    config = override(load_preset("omniglot-5w1s-paper"), {"filters": 8, "episode_batch": 2})
    episodes = omniglot_episodes(config, 5, torch.float32)
    items = episode_items(build_method(config), episodes)
    assert [len(item) for item in items if isinstance(item, Episodes)] == [2, 2]
    assert items[-1] is episodes[-1]  # the last of an odd share alone
    protonet = build_method(override(config, {"method": "protonet"}))
    assert not protonet.batches_episodes()
    assert episode_items(protonet, episodes) == episodes


def test_episode_batch_is_checked() -> None:
    with pytest.raises(ConfigError, match="episode_batch"):
        override(Config(), {"episode_batch": 0})


def test_evaluate_takes_an_episode_batch(data_env: Path) -> None:
    argv = ["evaluate", "--checkpoint", "omniglot-5w1s", "--episodes", "3", "--quiet", "--json"]
    code, out, _ = run_cli([*argv, "--episode-batch", "2"])
    assert code == 0 and json.loads(out)["episode_batch"] == 2
    code, _, err = run_cli([*argv, "--episode-batch", "0"])
    assert code != 0 and "--episode-batch 0 is invalid; use 1 or more" in err


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bench_times_batches_of_episodes(mode: str) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(
        ["--image-size", "16", "--filters", "8", "--ways", "2", "--queries", "1", "--steps", "1",
         "--episodes", "2", "--warmup", "0", "--device", "cpu", "--mode", mode,
         "--meta-batch", "2", "--episode-batch", "2", "--json"]
    )  # fmt: skip
    result = bench_main(args)
    assert result["timed_episodes"] == 2 and result["settings"]["episode_batch"] == 2
    # two episodes of 8 filters in one pass: 16 channels, which the native block kernels take
    assert result["settings"]["block_kernels"] == layers.block_kernels(torch.device("cpu"), 16)
