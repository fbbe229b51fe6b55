"""A conv-4 classifier pre-trained on all meta-training classes: the start of two baselines.

Ravi & Larochelle (2017), Sec. 5: the *Baseline-finetune* and *Baseline-nearest-neighbour* methods
start from "a neural network pre-trained on all the meta-training classes", trained as an ordinary
classifier on mini-batches (not episodes). That network is the learner's conv-4 architecture
(:class:`~metalstm.learner.Learner`, same filters) with one output per training class.

* :class:`ClassBatches` draws those mini-batches, as a pure function of (seed, step) like the
  episode sampler, so a resumed pre-training continues exactly.
* :class:`PretrainedClassifier` is the shared :class:`~metalstm.algorithm.Algorithm` base: its
  ``trains_on`` is ``"batches"``, so the shared Trainer calls :meth:`batch_loss`. Its state (θ of
  the C-way network, its batch-norm running statistics and the fine-tuning settings chosen on
  validation episodes) is the same for both baselines, so one pre-training serves both.

Batch norm: the pre-trained network keeps ordinary running statistics over the whole pre-training
(momentum 0.1, PyTorch's default), and uses them at evaluation time (the usual eval mode: no
statistics from the test episode at all, so it is never transductive).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algorithm import Algorithm, EpisodeLoss, accuracy
from ..config import Config, override, parse_positive_numbers
from ..data import ClassImages, Episode
from ..data.episodes import shard
from ..errors import ConfigError
from ..learner import BatchNormState, Learner, LearnerShape

PRETRAIN_BN_MOMENTUM = 0.1
"""Weight of each mini-batch in the pre-trained network's running statistics."""


class ClassBatches:
    """Ordinary shuffled mini-batches over every image of every training class.

    Labels are class indices ``0..C-1`` (the order of ``data``'s classes). Epoch ``e`` visits the
    images in the order of a permutation drawn from ``PCG64(SeedSequence([seed, e]))``, in
    ``len(images) // batch_size`` full batches (the incomplete last one is dropped), so batch
    ``step`` is a pure function of (seed, step).
    """

    def __init__(self, data: ClassImages, batch_size: int, seed: int) -> None:
        counts = data.class_count
        total = int(counts.sum())
        if batch_size < 1 or batch_size > total:
            raise ConfigError(
                f"invalid value pretrain_batch={batch_size}; use 1 to {total} (the number of "
                "training images)"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.labels = torch.repeat_interleave(torch.arange(data.n_classes), counts)
        offsets = torch.arange(total) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        self.rows = torch.repeat_interleave(data.class_start, counts) + offsets
        self.steps_per_epoch = total // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def steps(self, epochs: float) -> int:
        """Number of updates of ``epochs`` passes over the images (at least one)."""
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def order(self, epoch: int) -> Tensor:
        """The permutation of image indices of ``epoch``."""
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._order = torch.from_numpy(rng.permutation(len(self.rows)))
            self._epoch = epoch
        return self._order

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """This rank's share of mini-batch ``step``: images float32 [B, C, H, W] in [0, 1] and
        their labels [B]."""
        epoch, index = divmod(step, self.steps_per_epoch)
        first, stop = shard(self.batch_size, rank, world_size)
        start = index * self.batch_size
        picks = self.order(epoch)[start + first : start + stop]
        images = self.data.images[self.rows[picks]].float() / 255
        return images, self.labels[picks]


def parse_grid(config: Config, key: str, kind: type[float] | type[int]) -> list[float]:
    """The comma-separated values of config field ``key`` (all positive)."""
    return parse_positive_numbers(str(getattr(config, key)), key, kind)


def _buffer_name(name: str) -> str:
    return "bn_" + name.replace(".", "_")


class PretrainedClassifier(Algorithm):
    """The conv-4 network pre-trained as a C-way classifier over all meta-training classes.

    ``config.pretrain_classes`` fixes C; the Trainer fills it in from the data
    (:meth:`configure`), and it is saved with every checkpoint, so a checkpoint alone rebuilds it.
    """

    trains_on: ClassVar[str] = "batches"
    finetune_lr: Tensor  # buffers: the fine-tuning settings (see Finetune.validate)
    finetune_steps: Tensor

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if config.pretrain_classes < 2:
            raise ConfigError(
                f"pretrain_classes={config.pretrain_classes} is not resolved; the Trainer sets it "
                "to the number of training classes, or set it with --set pretrain_classes=C"
            )
        shape = LearnerShape(
            config.channels, config.image_size, config.pretrain_classes, config.filters
        )
        self.network = Learner(shape, PRETRAIN_BN_MOMENTUM, config.bn_eps)
        self.theta = nn.Parameter(self.network.initial_theta())  # θ of the C-way network
        self.n_body = sum(
            size
            for name, size in zip(self.network.names, self.network.sizes)
            if not name.startswith("head.")
        )  # the conv blocks come first in θ, the linear head last
        self.bn_names = list(self.network.fresh_batchnorm_state())
        for name, value in self.network.fresh_batchnorm_state().items():
            self.register_buffer(_buffer_name(name), value)
        # Fine-tuning settings: the middle of each grid until validation chooses (Finetune).
        lrs = parse_grid(config, "finetune_lr_grid", float)
        steps = parse_grid(config, "finetune_steps_grid", int)
        self.register_buffer("finetune_lr", torch.tensor(lrs[len(lrs) // 2]))
        self.register_buffer("finetune_steps", torch.tensor(int(steps[len(steps) // 2])))

    @classmethod
    def configure(cls, config: Config, train: ClassImages) -> Config:
        """Set ``pretrain_classes`` to the number of training classes (refuse a mismatch)."""
        if config.pretrain_classes == 0:
            return override(config, {"pretrain_classes": train.n_classes})
        if config.pretrain_classes != train.n_classes:
            raise ConfigError(
                f"pretrain_classes={config.pretrain_classes} but the training split has "
                f"{train.n_classes} classes; set pretrain_classes=0 to use them all"
            )
        return config

    def test_batchnorm(self) -> str:
        return "pre-training statistics"

    def bn_state(self) -> BatchNormState:
        """The running statistics of the pre-training (the buffers themselves, not copies)."""
        return {name: getattr(self, _buffer_name(name)) for name in self.bn_names}

    def batch_loss(self, images: Tensor, labels: Tensor) -> EpisodeLoss:
        """Cross-entropy of the C-way classifier; updates the running statistics."""
        logits = self.network(self.theta, images, self.bn_state(), batch_stats=True)
        return EpisodeLoss(F.cross_entropy(logits, labels), accuracy(logits, labels))

    def meta_loss(self, episode: Episode) -> EpisodeLoss:
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
