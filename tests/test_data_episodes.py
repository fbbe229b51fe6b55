"""Episodes: determinism, label and identity invariants, sharding, fixed lists and the loader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metalstm.data import (
    ClassImages,
    Episode,
    EpisodeSampler,
    episode_loader,
    episodes_fingerprint,
    fixed_episodes,
    load_split,
)
from metalstm.errors import ConfigError, DataError


def make_data(
    counts: list[int], shape: tuple[int, int, int] = (1, 4, 4), seed: int = 0
) -> ClassImages:
    """Random uint8 images, ``counts[c]`` rows for class ``c``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (sum(counts), *shape), dtype=torch.uint8, generator=generator)
    return ClassImages.from_counts(images, counts, [f"class{c}" for c in range(len(counts))])


def assert_same(a: Episode, b: Episode) -> None:
    for name in Episode.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def check_episode(episode: Episode, data: ClassImages, n: int, k: int, q: int) -> None:
    """Every invariant an episode must satisfy."""
    c, h, w = data.image_shape
    assert episode.support_x.shape == (n * k, c, h, w) and episode.support_x.dtype == torch.float32
    assert episode.query_x.shape == (n * q, c, h, w) and episode.query_x.dtype == torch.float32
    assert (episode.n_way, episode.k_shot, episode.q_query) == (n, k, q)
    assert Counter(episode.support_y.tolist()) == dict.fromkeys(range(n), k)
    assert Counter(episode.query_y.tolist()) == ({i: q for i in range(n)} if q else {})
    assert len(set(episode.classes.tolist())) == n
    ids = torch.cat([episode.support_ids, episode.query_ids])
    assert len(set(ids.tolist())) == len(ids)  # support and query never share an image
    labels = torch.cat([episode.support_y, episode.query_y])
    start = data.class_start[episode.classes[labels]]
    count = data.class_count[episode.classes[labels]]
    assert ((ids >= start) & (ids < start + count)).all()  # every image is from its label's class
    assert torch.equal(episode.support_x, data.images[episode.support_ids].float() / 255)
    assert torch.equal(episode.query_x, data.images[episode.query_ids].float() / 255)


@pytest.fixture(scope="module")
def omniglot_train(data_root: Path, session_cache: Path) -> ClassImages:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METALSTM_CACHE", str(session_cache))
        return load_split("omniglot", "vinyals", "train", data_root=data_root)


def test_omniglot_episodes(omniglot_train: ClassImages) -> None:
    for n, k, q in ((5, 1, 15), (20, 5, 15), (5, 5, 15)):
        sampler = EpisodeSampler(omniglot_train, n, k, q, seed=3)
        for step in range(3):
            check_episode(sampler.episode(step), omniglot_train, n, k, q)


def test_same_arguments_give_identical_episodes(omniglot_train: ClassImages) -> None:
    a = EpisodeSampler(omniglot_train, 5, 1, 15, seed=7)
    b = EpisodeSampler(omniglot_train, 5, 1, 15, seed=7)
    for step, slot in ((0, 0), (123_456, 3), (10**12, 0)):
        assert_same(a.episode(step, slot), b.episode(step, slot))
        assert_same(a.episode(step, slot), a.episode(step, slot))


def test_different_arguments_give_different_episodes(omniglot_train: ClassImages) -> None:
    sampler = EpisodeSampler(omniglot_train, 5, 1, 15, seed=7)
    other_seed = EpisodeSampler(omniglot_train, 5, 1, 15, seed=8)
    keys = {
        tuple(e.support_ids.tolist() + e.query_ids.tolist())
        for e in (
            sampler.episode(0),
            sampler.episode(1),
            sampler.episode(0, 1),
            other_seed.episode(0),
        )
    }
    assert len(keys) == 4


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    n=st.integers(1, 12),
    k=st.integers(1, 5),
    q=st.integers(0, 6),
    seed=st.integers(0, 2**32),
    step=st.integers(0, 10**9),
)
def test_episode_invariants(
    counts: list[int], n: int, k: int, q: int, seed: int, step: int
) -> None:
    """Variable class sizes: every valid configuration gives a well-formed episode."""
    data = make_data(counts)
    if n > data.n_classes or min(counts) < k + q:
        with pytest.raises(DataError):
            EpisodeSampler(data, n, k, q, seed)
        return
    check_episode(EpisodeSampler(data, n, k, q, seed).episode(step), data, n, k, q)


def test_classes_and_images_are_uniform_and_labels_unordered() -> None:
    data = make_data([10] * 10)
    sampler = EpisodeSampler(data, 5, 1, 2, seed=0)
    episodes = [sampler.episode(step) for step in range(2000)]
    class_counts = Counter(c for e in episodes for c in e.classes.tolist())
    assert all(900 < class_counts[c] < 1100 for c in range(10))  # expected 1000 each
    image_counts = Counter(i for e in episodes for i in e.support_ids.tolist())
    assert all(50 < image_counts[i] < 150 for i in range(100))  # expected 100 each
    assert any(e.classes.tolist() != sorted(e.classes.tolist()) for e in episodes)


def test_meta_batch_shards_reproduce_the_single_process_batch() -> None:
    sampler = EpisodeSampler(make_data([6] * 8), 3, 1, 2, seed=1)
    whole = sampler.meta_batch(step=5, size=8)
    assert len(whole) == 8
    for world_size in (2, 4, 8):
        shards = [sampler.meta_batch(5, 8, rank, world_size) for rank in range(world_size)]
        assert [len(s) for s in shards] == [8 // world_size] * world_size
        for a, b in zip(whole, [e for s in shards for e in s], strict=True):
            assert_same(a, b)
    assert_same(whole[3], sampler.episode(5, 3))


@pytest.mark.parametrize(
    ("size", "rank", "world_size", "match"),
    [
        (6, 0, 4, "not divisible"),
        (4, 4, 4, "below world_size"),
        (0, 0, 1, "size"),
        (4, -1, 2, "rank"),
    ],
)
def test_bad_sharding(size: int, rank: int, world_size: int, match: str) -> None:
    sampler = EpisodeSampler(make_data([6] * 8), 3, 1, 2, seed=1)
    with pytest.raises(ConfigError, match=match):
        sampler.meta_batch(0, size, rank, world_size)


def test_too_few_classes() -> None:
    with pytest.raises(DataError, match="n_way=5 but the data has only 3 classes"):
        EpisodeSampler(make_data([20] * 3), 5, 1, 15, seed=0)


def test_class_with_too_few_images() -> None:
    message = "class 'class2' has 12 images, fewer than k_shot \\+ q_query = 1 \\+ 15"
    with pytest.raises(DataError, match=message):
        EpisodeSampler(make_data([20, 20, 12, 20, 20, 20]), 5, 1, 15, seed=0)


@pytest.mark.parametrize(
    ("n", "k", "q", "seed"),
    [(0, 1, 1, 0), (2, 0, 1, 0), (2, 1, -1, 0), (2, 1, 1, -1), (2, 1.5, 1, 0), (True, 1, 1, 0)],
)
def test_bad_episode_settings(n: int, k: int, q: int, seed: int) -> None:
    with pytest.raises(ConfigError):
        EpisodeSampler(make_data([10] * 4), n, k, q, seed)


def test_bad_step_or_slot() -> None:
    sampler = EpisodeSampler(make_data([10] * 4), 2, 1, 1, seed=0)
    with pytest.raises(ConfigError, match="step"):
        sampler.episode(-1)
    with pytest.raises(ConfigError, match="slot"):
        sampler.episode(0, -2)


def test_fixed_episodes_and_fingerprint() -> None:
    data = make_data([8] * 12)
    fixed = fixed_episodes(data, 4, 2, 3, seed=11, count=25)
    sampler = EpisodeSampler(data, 4, 2, 3, seed=11)
    assert len(fixed) == 25
    assert_same(fixed[7], sampler.episode(7, 0))
    assert_same(fixed[-1], sampler.episode(24))
    assert [e.classes.tolist() for e in fixed[2:5]] == [
        sampler.episode(i).classes.tolist() for i in (2, 3, 4)
    ]
    with pytest.raises(IndexError):
        fixed[25]
    listed = list(fixed)
    assert fixed.fingerprint() == episodes_fingerprint(listed)
    assert fixed.fingerprint() == fixed_episodes(data, 4, 2, 3, seed=11, count=25).fingerprint()
    assert fixed.fingerprint() != fixed_episodes(data, 4, 2, 3, seed=12, count=25).fingerprint()
    assert fixed.fingerprint() != fixed_episodes(data, 4, 2, 3, seed=11, count=24).fingerprint()


def test_episodes_are_stable_across_versions() -> None:
    """The sampling scheme is part of the evaluation protocol: changing it changes every result."""
    fixed = fixed_episodes(make_data([8] * 12), 4, 2, 3, seed=0, count=3)
    assert fixed[0].classes.tolist() == [7, 3, 0, 9]
    assert fixed.fingerprint() == "f45326427977d6e497db339fa53e513dea59a7f8020130ead568a78af9821536"


def test_omniglot_test_episodes_are_pinned(data_root: Path, session_cache: Path) -> None:
    """The 600 standard 5-way 1-shot test episodes of the vinyals split, identified for good."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METALSTM_CACHE", str(session_cache))
        test = load_split("omniglot", "vinyals", "test", data_root=data_root)
    fixed = fixed_episodes(test, 5, 1, 15, seed=0, count=600)
    assert fixed[0].classes.tolist() == [1077, 456, 69, 27, 1376]
    assert fixed.fingerprint() == "e720e083865a6424a006a80fbdf5e06344abb8a89319984d93c3ac93a7c31a21"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_output_does_not_depend_on_workers(num_workers: int) -> None:
    sampler = EpisodeSampler(make_data([6] * 10, shape=(3, 5, 5)), 3, 2, 2, seed=4)
    loader = episode_loader(
        sampler, 6, meta_batch_size=4, start_step=10, rank=1, world_size=2, num_workers=num_workers
    )
    batches = list(loader)
    assert len(loader) == 6 and len(batches) == 6
    for step, batch in enumerate(batches, start=10):
        assert len(batch) == 2
        for episode, expected in zip(batch, sampler.meta_batch(step, 4, 1, 2), strict=True):
            assert_same(episode, expected)


def test_episode_to_device() -> None:
    episode = EpisodeSampler(make_data([5] * 4), 2, 2, 1, seed=0).episode(0)
    moved = episode.to("cpu")
    assert_same(moved, episode)
    assert moved.query_x.device.type == "cpu"
