"""Shared test fixtures: the data root, one Omniglot decode per session, small generated images."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from metalstm import Config, override
from metalstm.cli import main
from metalstm.learner import Learner

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread is faster, and much faster on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``$METALSTM_DATA``, default ``../shared/data``; tests needing Omniglot skip without it."""
    root = Path(os.environ.get("METALSTM_DATA") or DEFAULT_DATA_ROOT)
    if not (root / "omniglot" / "images_background.zip").is_file():
        pytest.skip(f"no Omniglot archives under {root}; set METALSTM_DATA")
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-image cache folder for the whole session (Omniglot is decoded once)."""
    return tmp_path_factory.mktemp("metalstm-cache")


@pytest.fixture
def data_env(
    data_root: Path, session_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point METALSTM_DATA at the data root and METALSTM_CACHE at the session cache.

    XDG_CACHE_HOME goes to a temporary folder so nothing lands in the real per-user cache.
    """
    monkeypatch.setenv("METALSTM_DATA", str(data_root))
    monkeypatch.setenv("METALSTM_CACHE", str(session_cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return data_root


def write_image(
    path: Path, *, size: tuple[int, int] = (100, 90), mode: str = "RGB", seed: int = 0
) -> Path:
    """Write a random-colour image (``size`` is width x height) in ``mode``; format from suffix."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def make_image_folder(
    root: Path,
    class_sizes: dict[str, int],
    *,
    suffix: str = ".png",
    modes: Iterable[str] = ("RGB",),
) -> Path:
    """An ImageFolder layout: ``root/<class>/<i>.<suffix>``, cycling through ``modes`` and sizes."""
    mode_list = list(modes)
    for c, (name, count) in enumerate(class_sizes.items()):
        for i in range(count):
            size = (40 + 7 * (i % 3), 30 + 5 * (c % 4))
            write_image(
                root / name / f"{i:03d}{suffix}",
                size=size,
                mode=mode_list[i % len(mode_list)],
                seed=100 * c + i,
            )
    return root


def reference_net(learner: Learner, theta: Tensor, momentum: float, eps: float) -> nn.Sequential:
    """An independent copy of the learner at θ with nn.Conv2d / nn.BatchNorm2d / nn.Linear (and
    nn.MaxPool2d, or stride-2 convolutions and nn.AdaptiveAvgPool2d)."""
    p = learner.unflatten(theta.detach())
    pool = learner.shape.downsample == "pool"
    layers: list[nn.Module] = []
    for i in range(4):
        w = p[f"blocks.{i}.conv.weight"]
        stride = 1 if pool else 2
        conv = nn.Conv2d(w.shape[1], w.shape[0], 3, stride, padding=1, dtype=theta.dtype)
        norm = nn.BatchNorm2d(w.shape[0], momentum=momentum, eps=eps, dtype=theta.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(p[f"blocks.{i}.conv.bias"])
            norm.weight.copy_(p[f"blocks.{i}.norm.weight"])
            norm.bias.copy_(p[f"blocks.{i}.norm.bias"])
        layers += [conv, norm, nn.ReLU(), nn.MaxPool2d(2) if pool else nn.Identity()]
    w = p["head.weight"]
    head = nn.Linear(w.shape[1], w.shape[0], dtype=theta.dtype)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(p["head.bias"])
    average = nn.Identity() if pool else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(*layers, average, nn.Flatten(), head)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / √n)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's event files (empty without tensorboard)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def small_config(**changes: object) -> Config:
    """A learner small enough for float64 finite differences and quick tests: 16x16 grey images,
    3-way 2-shot with 2 queries, 3 filters (n = 318 coordinates), T = 3, on the CPU."""
    values: dict[str, object] = dict(
        image_size=16,
        channels=1,
        n_way=3,
        k_shot=2,
        q_query=2,
        filters=3,
        inner_steps=3,
        device="cpu",
    )
    values.update(changes)
    return override(Config(), values)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, out.getvalue(), err.getvalue()
