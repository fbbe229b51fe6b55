"""Ordinary mini-batches over every image of every class, for methods trained on batches."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .episodes import shard
from .images import ClassImages


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
