"""N-way K-shot episodes, sampled as pure functions of ``(seed, step, slot)``.

Randomness: episode ``(step, slot)`` draws from its own generator,
``PCG64(SeedSequence([seed, step, slot]))``, and only ever asks it for uniform doubles, so an
episode is bit-identical on every call, in every process and whatever the number of workers.

Drawing: classes are drawn one at a time, uniformly, repeats rejected; label ``i`` is the ``i``-th
class drawn, so labels map to classes in a random order. In each drawn class, one uniform key per
image; the K + Q smallest, in key order, are its K support then Q query images, so support and
query never share an image. Rows are class-major: label 0's K images first.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import overload

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from .images import ClassImages


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task: support and query images (float32 in [0, 1]) with labels 0..N-1."""

    support_x: torch.Tensor  # float32 [N*K, C, H, W]
    support_y: torch.Tensor  # int64 [N*K]
    query_x: torch.Tensor  # float32 [N*Q, C, H, W]
    query_y: torch.Tensor  # int64 [N*Q]
    classes: torch.Tensor  # int64 [N], source class of label i
    support_ids: torch.Tensor  # int64 [N*K], rows of ClassImages.images
    query_ids: torch.Tensor  # int64 [N*Q]

    @property
    def n_way(self) -> int:
        """N, the number of classes."""
        return int(self.classes.numel())

    @property
    def k_shot(self) -> int:
        """K, support images per class."""
        return int(self.support_y.numel()) // self.n_way

    @property
    def q_query(self) -> int:
        """Q, query images per class."""
        return int(self.query_y.numel()) // self.n_way

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """This episode with every tensor on ``device``."""
        return Episode(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def pin_memory(self) -> Episode:
        """This episode in page-locked memory (used by ``DataLoader(pin_memory=True)``)."""
        return Episode(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


@dataclass(frozen=True)
class Episodes:
    """E episodes of one shape stacked, for one batched pass of the learner through all of them
    (``Config.episode_batch``; :mod:`metalstm.learner`)."""

    support_x: torch.Tensor  # float32 [E, N*K, C, H, W]
    support_y: torch.Tensor  # int64 [E, N*K]
    query_x: torch.Tensor  # float32 [E, N*Q, C, H, W]
    query_y: torch.Tensor  # int64 [E, N*Q]

    @classmethod
    def stack(cls, episodes: Sequence[Episode]) -> Episodes:
        """The episodes (all N-way K-shot with Q queries per class) as one batch."""
        names = [f.name for f in fields(cls)]
        return cls(*(torch.stack([getattr(e, name) for e in episodes]) for name in names))

    @classmethod
    def of(cls, episodes: Sequence[Episode]) -> Episode | Episodes:
        """One episode as it is (the one-episode path), several as one batch."""
        return episodes[0] if len(episodes) == 1 else cls.stack(episodes)

    def __len__(self) -> int:
        return int(self.support_y.shape[0])


def _check_int(name: str, value: int, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}") from None
    if isinstance(value, bool) or number < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return number


class EpisodeSampler:
    """Draws N-way K-shot Q-query episodes from ``data``, deterministic in (seed, step, slot)."""

    def __init__(self, data: ClassImages, n_way: int, k_shot: int, q_query: int, seed: int):
        self.data = data
        self.n_way = _check_int("n_way", n_way, 1)
        self.k_shot = _check_int("k_shot", k_shot, 1)
        self.q_query = _check_int("q_query", q_query, 0)
        self.seed = _check_int("seed", seed, 0)
        if self.n_way > data.n_classes:
            raise DataError(
                f"n_way={n_way} but the data has only {data.n_classes} classes; "
                "lower n_way or use a split with more classes"
            )
        self._images = data.images.numpy()
        self._starts = data.class_start.numpy()
        self._counts = data.class_count.numpy()
        self._check_class_sizes()
        self._equal_counts = bool((self._counts == self._counts[0]).all())
        self._support_y = torch.arange(self.n_way).repeat_interleave(self.k_shot)
        self._query_y = torch.arange(self.n_way).repeat_interleave(self.q_query)

    def _check_class_sizes(self) -> None:
        need = self.k_shot + self.q_query
        short = np.flatnonzero(self._counts < need)
        if short.size:
            c = int(short[0])
            raise DataError(
                f"class {self.data.class_names[c]!r} has {self._counts[c]} images, fewer than "
                f"k_shot + q_query = {self.k_shot} + {self.q_query}; lower k_shot/q_query or add "
                f"images ({short.size} classes are too small)"
            )

    def episode_ids(self, step: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(classes [N], support rows [N*K], query rows [N*Q])`` of episode ``(step, slot)``."""
        seq = np.random.SeedSequence(
            [self.seed, _check_int("step", step, 0), _check_int("slot", slot, 0)]
        )
        rng = np.random.Generator(np.random.PCG64(seq))
        classes = _draw_distinct(rng, len(self._counts), self.n_way)
        counts = self._counts[classes]
        keys = rng.random((self.n_way, int(counts.max())))
        if not self._equal_counts:  # keys beyond a class's images are never drawn
            keys[np.arange(keys.shape[1]) >= counts[:, None]] = 2.0
        picks = np.argsort(keys, axis=1)[:, : self.k_shot + self.q_query]
        rows = self._starts[classes, None] + picks
        return classes, rows[:, : self.k_shot].ravel(), rows[:, self.k_shot :].ravel()

    def episode(self, step: int, slot: int = 0) -> Episode:
        """Episode ``slot`` of meta-batch ``step``: a pure function of (seed, step, slot)."""
        classes, support, query = self.episode_ids(step, slot)
        ids = np.concatenate([support, query])
        # numpy, not torch: single-threaded, so small episodes never wait on a thread pool.
        x = self._images.take(ids, axis=0).astype(np.float32)
        x /= np.float32(255)  # exactly torch's ``x.float() / 255``
        ids_t = torch.from_numpy(ids)
        n_support = support.size
        return Episode(
            support_x=torch.from_numpy(x[:n_support]),
            support_y=self._support_y.clone(),
            query_x=torch.from_numpy(x[n_support:]),
            query_y=self._query_y.clone(),
            classes=torch.from_numpy(classes),
            support_ids=ids_t[:n_support],
            query_ids=ids_t[n_support:],
        )

    def meta_batch(self, step: int, size: int, rank: int = 0, world_size: int = 1) -> list[Episode]:
        """This rank's contiguous share of the global meta-batch ``step`` (slots ``0..size-1``)."""
        first, stop = shard(size, rank, world_size)
        return [self.episode(step, slot) for slot in range(first, stop)]


def shard(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Slots ``[first, stop)`` of ``rank`` when ``size`` slots are split over ``world_size``."""
    size = _check_int("meta-batch size", size, 1)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if size % world_size:
        raise ConfigError(
            f"meta-batch size {size} is not divisible by world_size {world_size}; "
            "use a multiple of the number of processes"
        )
    if rank >= world_size:
        raise ConfigError(f"rank={rank} must be below world_size={world_size}")
    return rank * size // world_size, (rank + 1) * size // world_size


def _draw_distinct(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` distinct integers below ``n`` in draw order: uniform draws, repeats rejected."""
    drawn: dict[int, None] = {}  # insertion-ordered set
    while len(drawn) < k:
        for value in (rng.random(2 * k) * n).astype(np.int64).tolist():
            drawn.setdefault(min(value, n - 1))  # u * n rounds up to n with probability ~2^-53
            if len(drawn) == k:
                break
    return np.fromiter(drawn, dtype=np.int64, count=k)


class FixedEpisodes(Sequence[Episode]):
    """The fixed evaluation episodes of a sampler: episode ``i`` is ``sampler.episode(i, 0)``.

    Episodes are drawn lazily when indexed, so a long list costs no memory.
    """

    def __init__(self, sampler: EpisodeSampler, count: int):
        self.sampler = sampler
        self.n_episodes = _check_int("count", count, 0)

    def __len__(self) -> int:
        return self.n_episodes

    @overload
    def __getitem__(self, index: int) -> Episode: ...

    @overload
    def __getitem__(self, index: slice) -> list[Episode]: ...

    def __getitem__(self, index: int | slice) -> Episode | list[Episode]:
        if isinstance(index, slice):
            return [self.sampler.episode(i) for i in range(*index.indices(self.n_episodes))]
        i = operator.index(index)
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {index} out of range for {self.n_episodes} episodes")
        return self.sampler.episode(i % self.n_episodes)

    def __iter__(self) -> Iterator[Episode]:
        return (self.sampler.episode(i) for i in range(self.n_episodes))

    def fingerprint(self) -> str:
        """Same as ``episodes_fingerprint(self)``, without gathering any image."""
        digest = EpisodeDigest()
        for i in range(self.n_episodes):
            digest.add_ids(*self.sampler.episode_ids(i))
        return digest.hexdigest()


def fixed_episodes(
    data: ClassImages, n_way: int, k_shot: int, q_query: int, seed: int, count: int
) -> FixedEpisodes:
    """The fixed list identified by (data, N, K, Q, seed, count): ``episode(step=i, slot=0)``."""
    return FixedEpisodes(EpisodeSampler(data, n_way, k_shot, q_query, seed), count)


def episodes_fingerprint(episodes: Iterable[Episode]) -> str:
    """sha256 of the classes and image rows of ``episodes``: equal iff the same episodes."""
    digest = EpisodeDigest()
    for episode in episodes:
        digest.add(episode)
    return digest.hexdigest()


class EpisodeDigest:
    """:func:`episodes_fingerprint` built one episode at a time, keeping nothing of the episodes:
    a record of a long evaluation costs constant memory."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def add(self, episode: Episode) -> None:
        """Append one episode (its classes and image rows)."""
        ids = (episode.classes, episode.support_ids, episode.query_ids)
        self.add_ids(*(t.cpu().numpy() for t in ids))

    def add_ids(self, classes: np.ndarray, support: np.ndarray, query: np.ndarray) -> None:
        """Append one episode given by its class and image-row ids."""
        self._sha.update(_id_bytes(classes, support, query))

    def hexdigest(self) -> str:
        """The fingerprint of the episodes added so far."""
        return self._sha.hexdigest()


def _id_bytes(*arrays: np.ndarray) -> bytes:
    """Each array's length then its values, as little-endian int64."""
    return b"".join(
        np.int64(a.size).tobytes() + np.ascontiguousarray(a, dtype="<i8").tobytes() for a in arrays
    )


class _MetaBatches(Dataset[list[Episode]]):
    """Map-style dataset: item ``i`` is this rank's share of meta-batch ``start_step + i``."""

    def __init__(
        self,
        sampler: EpisodeSampler,
        size: int,
        start_step: int,
        num_steps: int,
        rank: int,
        world_size: int,
    ):
        shard(size, rank, world_size)  # validate early
        self.sampler, self.size, self.rank, self.world_size = sampler, size, rank, world_size
        self.start_step = _check_int("start_step", start_step, 0)
        self.num_steps = _check_int("num_steps", num_steps, 0)

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, index: int) -> list[Episode]:
        return self.sampler.meta_batch(
            self.start_step + index, self.size, self.rank, self.world_size
        )


def _keep(batch: list[Episode]) -> list[Episode]:
    return batch


def episode_loader(
    sampler: EpisodeSampler,
    num_steps: int,
    *,
    meta_batch_size: int = 1,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader[list[Episode]]:
    """Meta-batches ``start_step .. start_step + num_steps - 1`` (this rank's share), in order.

    Episodes are drawn in ``num_workers`` background processes; the output is identical whatever
    ``num_workers`` is, because each episode is a pure function of (seed, step, slot).
    """
    return DataLoader(
        _MetaBatches(sampler, meta_batch_size, start_step, num_steps, rank, world_size),
        batch_size=None,
        shuffle=False,
        num_workers=_check_int("num_workers", num_workers, 0),
        collate_fn=_keep,
        pin_memory=pin_memory,
    )
