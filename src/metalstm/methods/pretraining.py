"""A conv-4 classifier pre-trained on all meta-training classes: the start of two baselines.

Ravi & Larochelle (2017), Sec. 5: the *Baseline-finetune* and *Baseline-nearest-neighbour* methods
start from "a neural network pre-trained on all the meta-training classes", trained as an ordinary
classifier on mini-batches (not episodes). That network is the learner's conv-4 architecture
(:class:`~metalstm.learner.Learner`, same filters) with one output per training class.

* :class:`~metalstm.data.batches.ClassBatches` draws those mini-batches, as a pure function of
  (seed, step) like the episode sampler, so a resumed pre-training continues exactly.
* :class:`PretrainedClassifier` is the shared :class:`~metalstm.methods.base.Method` base: both
  baselines register with ``TrainsOn.BATCHES``, so the shared Trainer calls :meth:`batch_loss`.
  Its state (θ of the C-way network, its batch-norm running statistics and the fine-tuning
  settings chosen on validation episodes) is the same for both baselines: one pre-training
  serves both.

Batch norm: the pre-trained network keeps ordinary running statistics over the whole pre-training
(momentum 0.1, PyTorch's default), and uses them at evaluation time (the usual eval mode: no
statistics from the test episode at all, so it is never transductive).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, override, parse_positive_numbers
from ..data import ClassImages, Episode, Episodes
from ..errors import ConfigError
from ..learner import (
    BatchNormState,
    Learner,
    batchnorm_buffers,
    register_batchnorm_buffers,
)
from ..registry import BatchSettings
from .base import EpisodeLoss, Method, accuracy, learner_shape

PRETRAIN_BN_MOMENTUM = 0.1
"""Weight of each mini-batch in the pre-trained network's running statistics."""
BN_PREFIX = "bn_"  # of the buffers holding them


@dataclass(frozen=True)
class PretrainSettings(BatchSettings):
    """Settings of the pre-trained baselines (one pre-training serves both)."""

    pretrain_classes: int = 0  # outputs of the pre-trained classifier; 0 = every training class
    #                            (the Trainer fills it in from the data)
    finetune_lr_grid: str = "0.01,0.1,0.5"  # SGD learning rates tried on validation
    finetune_steps_grid: str = "10,50,100"  # SGD step counts tried on validation
    limits: ClassVar[Mapping[str, int]] = {**BatchSettings.limits, "pretrain_classes": 100_000}

    def checks(self) -> dict[str, bool]:
        parse_positive_numbers(self.finetune_lr_grid, "finetune_lr_grid", float)
        parse_positive_numbers(self.finetune_steps_grid, "finetune_steps_grid", int)
        return {**super().checks(), "pretrain_classes": self.pretrain_classes >= 0}


VALIDATION_CLASSES = 500
"""Classes drawn by the validation episodes that choose the fine-tuning settings: 100 episodes
of 5-way, 25 of 20-way, so every preset's choice rests on as many classes and queries."""


def pretrained_recipe(config: Config) -> dict[str, float | int]:
    """Recipe of the pre-trained baselines in ``compare``: 10 epochs of Adam on mini-batches of
    64, the fine-tuning settings chosen on validation episodes once, at the end, on
    :data:`VALIDATION_CLASSES` classes (every grid point fine-tunes on each episode: on 20-way
    5-shot one episode's 3 x 100 SGD steps over 100 support images take about 17 s of one Xeon
    core, so 100 episodes, 2,000 classes, would take half an hour; benchmarks/task_cost.py)."""
    return {
        "pretrain_epochs": 10.0,
        "pretrain_batch": 64,
        "meta_batch": 1,
        "lr": 1e-3,
        "clip_grad_norm": 10.0,
        "val_interval": 10**9,  # the Trainer always validates after the last step
        "val_episodes": max(1, VALIDATION_CLASSES // config.n_way),
    }


def parse_grid(settings: PretrainSettings, key: str, kind: type[float] | type[int]) -> list[float]:
    """The comma-separated values of settings field ``key`` (all positive)."""
    return parse_positive_numbers(str(getattr(settings, key)), key, kind)


class PretrainedClassifier(Method):
    """The conv-4 network pre-trained as a C-way classifier over all meta-training classes.

    ``settings.pretrain_classes`` fixes C; the Trainer fills it in from the data
    (:meth:`configure`), and it is saved with every checkpoint, so a checkpoint alone rebuilds it.
    """

    settings: PretrainSettings
    finetune_lr: Tensor  # buffers: the fine-tuning settings (see Finetune.validate)
    finetune_steps: Tensor

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        classes = self.settings.pretrain_classes
        if classes < 2:
            raise ConfigError(
                f"pretrain_classes={classes} is not resolved; the Trainer sets it "
                "to the number of training classes, or set it with --set pretrain_classes=C"
            )
        self.network = Learner(learner_shape(config, classes), PRETRAIN_BN_MOMENTUM, config.bn_eps)
        self.theta = nn.Parameter(self.network.initial_theta())  # θ of the C-way network
        self.n_body = sum(
            size
            for name, size in zip(self.network.names, self.network.sizes)
            if not name.startswith("head.")
        )  # the conv blocks come first in θ, the linear head last
        self.bn_names = register_batchnorm_buffers(self, self.network, BN_PREFIX)
        # Fine-tuning settings: the middle of each grid until validation chooses (Finetune).
        lrs = parse_grid(self.settings, "finetune_lr_grid", float)
        steps = parse_grid(self.settings, "finetune_steps_grid", int)
        self.register_buffer("finetune_lr", torch.tensor(lrs[len(lrs) // 2]))
        self.register_buffer("finetune_steps", torch.tensor(int(steps[len(steps) // 2])))

    @classmethod
    def configure(cls, config: Config, train: ClassImages) -> Config:
        """Set ``pretrain_classes`` to the number of training classes (refuse a mismatch)."""
        classes = getattr(config.settings, "pretrain_classes", 0)
        if classes == 0:
            return override(config, {"pretrain_classes": train.n_classes})
        if classes != train.n_classes:
            raise ConfigError(
                f"pretrain_classes={classes} but the training split has "
                f"{train.n_classes} classes; set pretrain_classes=0 to use them all"
            )
        return config

    def test_batchnorm(self) -> str:
        return "pre-training statistics"

    def bn_state(self) -> BatchNormState:
        """The running statistics of the pre-training (the buffers themselves, not copies)."""
        return batchnorm_buffers(self, self.bn_names, BN_PREFIX)

    def batch_loss(self, images: Tensor, labels: Tensor) -> EpisodeLoss:
        """Cross-entropy of the C-way classifier; updates the running statistics."""
        logits = self.network(self.theta, images, self.bn_state(), batch_stats=True)
        return EpisodeLoss(F.cross_entropy(logits, labels), accuracy(logits, labels))

    def meta_loss(self, episode: Episode | Episodes) -> EpisodeLoss:
        raise NotImplementedError(
            f"{self.name} is pre-trained on mini-batches (trains_on='batches'), not on episodes"
        )

    def embed(self, x: Tensor) -> Tensor:
        """Embedding [B, D] of images x: the pre-trained conv body, BN in eval mode."""
        with torch.no_grad():
            return self.network.features(self.theta, x, self.bn_state(), batch_stats=False)

    def body(self) -> Tensor:
        """The pre-trained conv-body coordinates of θ (shared with the N-way learner's layout)."""
        return self.theta.detach()[: self.n_body]
