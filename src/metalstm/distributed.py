"""Data parallelism over episodes with ``torch.distributed`` (launch with ``torchrun``).

Every rank draws its own share of each meta-batch from the deterministic sampler, computes its
episodes' meta-gradient, and one all-reduce per update sums the gradients (and the loss and
accuracy statistics); every rank then applies the same Adam step, so parameters stay identical.
With a single process every method here is the identity.
"""

from __future__ import annotations

import datetime
import hashlib
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
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params: list[nn.Parameter], stats: Tensor) -> Tensor:
        """Sum the gradients of ``params`` and the vector ``stats`` over ranks, in one all-reduce.

        Each rank's gradient is its share of the meta-batch mean already, so the sum is the mean
        over the global meta-batch. Returns the summed ``stats``.
        """
        if self.world_size == 1:
            return stats
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        device = grads[0].device
        flat = torch.cat([g.reshape(-1) for g in grads] + [stats.to(device, grads[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n
        return flat[offset:].to(stats.device, stats.dtype)

    def gather_episodes(self, values: list[T], total: int) -> list[T]:
        """Collect per-episode values sharded as ``range(rank, total, world_size)``, in order."""
        if self.world_size == 1:
            return values
        shards: list[list[T] | None] = [None] * self.world_size
        dist.all_gather_object(shards, values)
        merged: list[T | None] = [None] * total
        for rank, shard in enumerate(shards):
            assert shard is not None
            merged[rank : total : self.world_size] = shard
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

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
