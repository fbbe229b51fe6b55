"""Data parallelism over episodes with ``torch.distributed`` (launch with ``torchrun``).

Every rank draws its own contiguous share of each meta-batch from the deterministic sampler,
computes the meta-gradient of each of its episodes, and one all-gather per update brings every
episode's gradient (and loss and accuracy) to every rank, where they are summed in slot order;
every rank then applies the same Adam step, so parameters stay identical, and equal to those of
one process with the same thread count, bit for bit.
With a single process every method here is the identity.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank ``rank`` of ``world_size``."""

    rank: int
    world_size: int

    @classmethod
    def single(cls) -> Distributed:
        return cls(0, 1)

    @classmethod
    def from_environment(cls, device: torch.device, timeout_s: float = 300.0) -> Distributed:
        """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...).

        gloo on CPU, NCCL on CUDA. A rank that dies makes the others fail after ``timeout_s``
        instead of hanging forever.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls.single()
        if not dist.is_initialized():
            # torch's first optimizer imports torch._dynamo, and that import takes references
            # (10, torch 2.13) to any process group alive at that moment, which
            # destroy_process_group then cannot free: gloo's threads ran on until interpreter
            # teardown and now and then aborted the exit ('terminate called without an active
            # exception'). Imported first, it holds none (tests/test_distributed.py).
            import torch._dynamo  # noqa: F401

            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_gradients(self, params: list[nn.Parameter], rows: Tensor) -> Tensor:
        """Set the gradient of ``params`` to the sum of every rank's ``rows``, in a fixed order.

        ``rows`` [r, n + k] holds this rank's items (its episodes of the meta-batch, or its share
        of a mini-batch): each row the flat gradient of ``params`` (n values) then k statistics.
        The rows of all ranks are gathered in rank order, which is slot order since every rank
        owns a contiguous block of slots, and summed in that order. One process adds the same
        rows in the same order, so 1 and P processes give the same bits (an all-reduce would
        add them in an order of its own). Returns the k summed statistics.
        """
        if self.world_size > 1:
            shards = [torch.empty_like(rows) for _ in range(self.world_size)]
            dist.all_gather(shards, rows.contiguous())
            rows = torch.cat(shards)
        total = rows.sum(0)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = total[offset : offset + n].view_as(p).clone()
            offset += n
        return total[offset:]

    def shard_episodes(self, total: int, block: int = 1) -> list[int]:
        """This rank's episodes of ``0..total-1``: blocks of ``block`` consecutive episodes (the
        batches a method scores at once), block b to rank b mod world_size. Every batch is
        then the same whatever the number of processes, and so are its results."""
        return episode_shard(total, block, self.rank, self.world_size)

    def gather_episodes(self, values: list[T], total: int, block: int = 1) -> list[T]:
        """Collect per-episode values sharded by :meth:`shard_episodes`, in episode order."""
        if self.world_size == 1:
            return values
        shards: list[list[T] | None] = [None] * self.world_size
        dist.all_gather_object(shards, values)
        merged: list[T | None] = [None] * total
        for rank, shard in enumerate(shards):
            assert shard is not None
            for i, value in zip(episode_shard(total, block, rank, self.world_size), shard):
                merged[i] = value
        return cast(list[T], merged)

    def check_same_config(self, config_json: str) -> None:
        """Refuse to start when ranks were launched with different configurations."""
        if self.world_size == 1:
            return
        digest = hashlib.sha256(config_json.encode()).hexdigest()
        digests: list[str | None] = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise ConfigError(
                "ranks were started with different configurations; launch every rank with the "
                "same --preset and --set options"
            )

    def close(self) -> None:
        """Leave the process group once every rank is done, stopping gloo's threads (a rank
        exiting with them still running was seen to abort: 'terminate called without an active
        exception')."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def episode_shard(total: int, block: int, rank: int, world_size: int) -> list[int]:
    """The episodes of ``rank`` (:meth:`Distributed.shard_episodes`): of ``0..total-1``, the
    blocks b of ``block`` consecutive episodes with b mod ``world_size`` = ``rank``."""
    blocks = range(rank, math.ceil(total / block), world_size)
    return [i for b in blocks for i in range(b * block, min(total, (b + 1) * block))]
