"""Pins of issue #19: first-order MAML and Matching Networks, with the comparison's recipes, on real
Omniglot (5-way 1-shot) against what they did before.

* ``maml-fo`` with α = 0.4 (the second-order step) got a first-order meta-gradient nearly
  orthogonal to the second-order one (per-episode cosines about 0 at initialisation) and trained
  to 62 % where ``maml`` reached 90 %; its recipe now takes α = 0.1.
* ``matching`` softmaxed plain cosines, which lie in [0, 1] for the ReLU embeddings: a nearly flat
  attention (loss floor 0.9 nats in 5-way 1-shot) that plateaued at 81 %; the recipe now scales
  the cosines (``attention_scale``).

The thresholds sit halfway between the before and after figures measured over three seeds, so a
different CPU's rounding does not move a result across them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metalstm import build_method, load_method
from metalstm.config import Config, load_preset, override, with_recipe
from metalstm.data import EpisodeSampler
from metalstm.evaluation import evaluate
from metalstm.training import train
from metalstm.util import load_part

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe_config(method: str, **values: object) -> Config:
    """``method`` on omniglot-5w1s with the comparison's recipe, as ``metalstm compare`` runs it
    (:func:`~metalstm.config.with_recipe`: the method's own settings, not the preset's, which are
    the meta-learner's: its prototype head, 100-way training episodes)."""
    config = with_recipe(load_preset("omniglot-5w1s"), method)
    return override(config, {"device": "cpu", **values})


def short_training_accuracy(method: str, **values: object) -> float:
    """Test accuracy (50 fixed episodes) after a few seconds of training with the recipe."""
    config = recipe_config(
        method, filters=16, q_query=5, val_episodes=10, val_interval=10**6, **values
    )
    with tempfile.TemporaryDirectory() as run_dir:
        train(config, Path(run_dir), log=None)
        model, _ = load_method(Path(run_dir) / "best")
    return evaluate(model, episodes=50).mean


def test_first_order_maml_step_keeps_the_second_order_meta_gradient_direction(
    data_env: Path,
) -> None:
    # Measured at initialisation, these 6 episodes: α = 0.4 gives cosines −0.06..0.07 (mean
    # 0.001); α = 0.1 gives 0.21..0.33 (mean 0.26).
    config = recipe_config("maml-fo")
    torch.manual_seed(0)
    first = build_method(config)
    second = build_method(override(config, {"method": "maml"}))
    with torch.no_grad():
        second.theta.copy_(first.theta)
    sampler = EpisodeSampler(load_part(config, "train"), 5, 1, 15, seed=0)
    cosines = []
    for step in range(6):
        episode = sampler.episode(step)
        (g_first,) = torch.autograd.grad(first.meta_loss(episode).loss, first.theta)
        (g_second,) = torch.autograd.grad(second.meta_loss(episode).loss, second.theta)
        cosines.append(float(F.cosine_similarity(g_first, g_second, dim=0)))
    assert sum(cosines) / len(cosines) > 0.13, cosines


@pytest.mark.slow
def test_first_order_maml_recipe_trains_like_second_order(data_env: Path) -> None:
    # 400 episodes, filters 16, seeds 0-2: α = 0.4 reached 50-52 %, α = 0.1 62-65 %. Measured at
    # meta-batch 8 and Adam 2e-3: the recipe's 32 tasks per update would leave 12 updates.
    accuracy = short_training_accuracy("maml-fo", episodes=400, meta_batch=8, lr=2e-3)
    assert accuracy > 0.57, accuracy


@pytest.mark.slow
def test_matching_networks_recipe_attention_is_not_flat(data_env: Path) -> None:
    # 300 episodes, filters 16, seeds 0-2: plain cosine (scale 1) reached 61-62 %, scale 30 79-84 %.
    accuracy = short_training_accuracy("matching", episodes=300)
    assert accuracy > 0.72, accuracy
