"""Throughput benchmark: meta-training (or evaluation) episodes per second on synthetic images.

``metalstm bench`` builds a fresh meta-learner for the given episode shape, runs ``--warmup``
episodes, then times ``--episodes`` more, each one exactly as the training loop does it: draw the
episode (random images gathered from a pool made once on the compute device), adapt with the
meta-learner, query loss, backward, clip the meta-gradient, Adam step. ``--mode eval`` times
evaluation episodes instead: adapt without a meta-graph, then label the query set.

The last lines printed are the median seconds per episode, episodes/s, the estimated GFLOP per
episode (convolutions and linear head of every learner pass, forward and backward, plus the
meta-learner LSTM's arithmetic) and the achieved GFLOP/s, and peak memory; ``--json`` prints them
as one JSON object instead, ``--out FILE`` also writes that object to FILE.

Example::

    metalstm bench --image-size 84 --channels 3 --shots 5 --steps 8 --episodes 10
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .config import Config, override
from .data import Episode
from .distributed import Distributed
from .errors import ConfigError
from .evaluation import score_episodes
from .files import check_output, output_path, write_file
from .layers import block_kernels, conv_kernels
from .learner import DOWNSAMPLING, LearnerShape, conv_flops, conv_sides
from .machine import cpu_name
from .methods import build_method
from .methods.base import Method, learner_shape
from .methods.metalearner import LSTMSettings, step_kernels
from .training import episode_items, meta_gradient
from .util import resolve_device


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``metalstm bench`` (episode shape, learner, meta-training, output)."""
    parser.add_argument("--image-size", type=int, default=28, help="image side (default 28)")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 or 3")
    parser.add_argument("--ways", type=int, default=5, help="N classes per episode (default 5)")
    parser.add_argument("--shots", type=int, default=1, help="K support images per class")
    parser.add_argument("--queries", type=int, default=15, help="Q query images per class")
    parser.add_argument("--steps", type=int, default=12, help="T inner steps (default 12)")
    parser.add_argument(
        "--batch",
        type=int,
        help="support images per inner step (default N*K: the whole support set, as the paper)",
    )
    parser.add_argument("--filters", type=int, default=32, help="learner conv filters")
    parser.add_argument(
        "--downsample",
        choices=tuple(DOWNSAMPLING),
        default="pool",
        help="learner blocks: 2x2 max-pools (the paper's) or stride-2 convolutions (Finn et al.)",
    )
    parser.add_argument("--meta-batch", type=int, default=1, help="episodes per meta-update")
    parser.add_argument(
        "--episode-batch",
        type=int,
        default=1,
        help="episodes run as one batched pass of the learner (meta-training: groups of the "
        "meta-batch; --mode eval: episodes per timed call; default 1)",
    )
    parser.add_argument("--episodes", type=int, default=20, help="timed episodes (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed episodes first (default 2)")
    parser.add_argument(
        "--second-order", action="store_true", help="differentiate through the learner gradients"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    parser.add_argument(
        "--mode", choices=("train", "eval"), default="train", help="meta-training or evaluation"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the meta-learner step (default: off; eager fallback if it fails)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument(
        "--out", type=output_path, metavar="FILE", help="also write the JSON result here"
    )


def bench_config(args: argparse.Namespace) -> Config:
    """The :class:`Config` of the benchmarked run (the meta-learner's)."""
    values: dict[str, Any] = {
        "image_size": args.image_size,
        "channels": args.channels,
        "n_way": args.ways,
        "k_shot": args.shots,
        "q_query": args.queries,
        "inner_steps": args.steps,
        "filters": args.filters,
        "downsample": args.downsample,
        "meta_batch": args.meta_batch,
        "episode_batch": args.episode_batch,
        "second_order": args.second_order,
        "device": args.device,
        "seed": args.seed,
        "compile": args.compile,
    }
    return override(Config(), values)


class SyntheticEpisodes:
    """Episodes of uniform random images on the compute device: the data-sampling share of an
    episode as cheap as it gets, so the benchmark measures the algorithm. Each episode's images
    are a random draw from a pool of POOL episodes' worth made once, gathered from memory as
    :class:`metalstm.data.EpisodeSampler` gathers them from its in-memory arrays (drawing 2.1
    million new random numbers for each 84x84 5-shot episode took 5.7 ms on the Xeon, the
    gather 1.1 ms)."""

    POOL = 2  # episodes' worth of images in the pool

    def __init__(self, config: Config, batch: int, device: torch.device, seed: int) -> None:
        shape = (config.channels, config.image_size, config.image_size)
        self.batch, self.device = batch, device
        self.images = batch + config.n_way * config.q_query  # support, then query images
        self.generator = torch.Generator(device).manual_seed(seed)
        self.pool = torch.rand(
            (self.POOL * self.images, *shape), generator=self.generator, device=device
        )  # [POOL · images, C, H, W]
        self.support_y = torch.arange(batch, device=device) % config.n_way  # [batch]
        self.query_y = torch.arange(config.n_way, device=device).repeat_interleave(config.q_query)
        self.classes = torch.arange(config.n_way, device=device)

    def draw(self) -> Episode:
        order = torch.randperm(len(self.pool), generator=self.generator, device=self.device)
        x = self.pool[order[: self.images]]  # [batch + N·Q, C, H, W]
        support_x, query_x = x[: self.batch], x[self.batch :]
        return Episode(
            support_x,
            self.support_y,
            query_x,
            self.query_y,
            self.classes,
            self.support_y,
            self.query_y,
        )


def learner_pass_flops(shape: LearnerShape, batch: int, *, backward: bool) -> float:
    """FLOPs of one learner pass on ``batch`` images: the forward F, plus for the backward the
    weight gradients (F again) and the input gradients (F but the first layer's, as the images
    need none)."""
    forward = conv_flops(shape, batch)
    if not backward:
        return forward
    first_layer = 2 * batch * conv_sides(shape)[0] ** 2 * shape.channels * shape.filters * 9
    return 3 * forward - first_layer


def lstm_flops(n: int, hidden: int, steps: int, *, backward: bool) -> float:
    """FLOPs of the coordinate-wise LSTM over n coordinates and ``steps`` steps.

    Per coordinate and step, forward: layer 1's product (4H x (H + 2) multiply-adds, the loss
    features being folded into the bias), layer 2's (2 x (H + 2)), and ~12H element-wise
    operations (activations, cell update); the backward has two products of each size (weight
    and input gradients) and ~20H element-wise operations.
    """
    products = 2 * (4 * hidden * (hidden + 2) + 2 * (hidden + 2))
    per_step = products + 12 * hidden
    if backward:
        per_step += 2 * products + 20 * hidden
    return float(n * steps * per_step)


def episode_flops(config: Config, n: int, batch: int, mode: str) -> float:
    """Estimated FLOPs of one meta-training (``train``) or evaluation (``eval``) episode."""
    shape = learner_shape(config)
    queries = config.n_way * config.q_query
    # Inner loop: T passes on the support batch, each forward and backward (the learner's g_t).
    support = learner_pass_flops(shape, batch, backward=True)
    settings = config.settings
    assert isinstance(settings, LSTMSettings)
    if mode == "train" and settings.second_order:
        support *= 2  # backward of the backward, roughly the same again
    total = settings.inner_steps * support
    if mode == "train":
        # Query loss at θ_T, backward into θ_T; the meta-learner forward and backward.
        total += learner_pass_flops(shape, queries, backward=True)
        total += lstm_flops(n, settings.hidden_size, settings.inner_steps, backward=True)
    else:
        total += conv_flops(shape, queries)
        total += lstm_flops(n, settings.hidden_size, settings.eval_steps, backward=False)
    return total


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: the CUDA allocator's maximum, or the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    model: Method, optimizer: torch.optim.Optimizer, episodes: Sequence[Episode], clip: float
) -> float:
    """One meta-update through the Trainer's own :func:`metalstm.training.meta_gradient`
    (per-episode gradient rows, clipping, the non-finite skip); returns the loss."""
    items = [partial(model.meta_loss, item) for item in episode_items(model, list(episodes))]
    loss, _, finite = meta_gradient(
        model, optimizer, items, len(episodes), Distributed.single(), clip
    )
    if finite:
        optimizer.step()
    return loss


@dataclass
class Workload:
    """What one benchmark call runs: ``run()`` does ``per_call`` episodes (one meta-update of
    a meta-batch, or one evaluation episode) on a fresh model of ``config``."""

    config: Config
    device: torch.device
    model: Method
    batch: int  # support images per inner step
    per_call: int
    run: Callable[[], None]


def build_workload(args: argparse.Namespace) -> Workload:
    """The model, synthetic episodes and step function of the benchmark described by ``args``."""
    config = bench_config(args)
    device = resolve_device(args.device)
    batch = args.batch or config.n_way * config.k_shot
    if batch < 1 or args.episodes < 1 or args.warmup < 0:
        raise ConfigError("--batch and --episodes must be >= 1, --warmup >= 0")
    torch.manual_seed(args.seed)
    model = build_method(config).to(device)
    data = SyntheticEpisodes(config, batch, device, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if args.mode == "eval":
        model.eval()

        def run() -> None:  # as metalstm.evaluation.episode_accuracies scores them
            score_episodes(model.adapt_one, [data.draw() for _ in range(config.episode_batch)])
    else:
        model.train()

        def run() -> None:
            episodes = [data.draw() for _ in range(config.meta_batch)]
            train_step(model, optimizer, episodes, config.clip_grad_norm)

    per_call = config.episode_batch if args.mode == "eval" else config.meta_batch
    return Workload(config, device, model, batch, per_call, run)


def bench_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (see :func:`add_bench_arguments`); print the
    figures and return them as a dict."""
    if args.out is not None:
        check_output(args.out)
    work = build_workload(args)
    config, device, batch, per_call = work.config, work.device, work.batch, work.per_call
    settings = config.settings
    assert isinstance(settings, LSTMSettings)  # bench_config: the meta-learner
    n = work.model.learner.n_params
    calls = max(1, -(-args.episodes // per_call))  # timed calls (meta-updates or episodes)
    warm = _time_calls(work.run, max(args.warmup, 0), device)
    times = _time_calls(work.run, calls, device)
    s_per_episode = statistics.median(wall for wall, _ in times) / per_call
    # CPU seconds of this process: what the episode costs on a machine shared with other jobs.
    cpu_per_episode = statistics.median(cpu for _, cpu in times) / per_call
    gflop = episode_flops(config, n, batch, args.mode) / 1e9
    together = min(config.episode_batch, per_call)  # episodes in one batched pass
    result: dict[str, Any] = {
        "s_per_episode": s_per_episode,
        "episodes_per_s": 1.0 / s_per_episode,
        "gflop_per_episode": gflop,
        "gflops": gflop / s_per_episode,
        "peak_memory_mb": peak_memory_mb(device),
        "cpu_s_per_episode": cpu_per_episode,
        "first_episode_s": (warm[0] if warm else times[0])[0] / per_call,
        "timed_episodes": calls * per_call,
        "settings": {
            "mode": args.mode,
            "image_size": config.image_size,
            "channels": config.channels,
            "ways": config.n_way,
            "shots": config.k_shot,
            "queries": config.q_query,
            "steps": settings.inner_steps,
            "batch": batch,
            "filters": config.filters,
            "downsample": config.downsample,
            "hidden": settings.hidden_size,
            "meta_batch": config.meta_batch,
            "episode_batch": together,
            "second_order": settings.second_order,
            "compile": config.compile,
            "step_kernels": step_kernels(config.compile, device, torch.float32),
            # a batch of E episodes: E x filters channels in one pass
            "block_kernels": block_kernels(
                device, config.filters * together, config.downsample == "pool"
            ),
            "conv_kernels": conv_kernels(device, config.filters),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "learner_params": n,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu": cpu_name(),
        },
    }
    if args.out is not None:
        write_file(args.out, json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        s = result["settings"]
        print(
            f"{args.mode}: {s['image_size']}x{s['image_size']}x{s['channels']}, "
            f"{s['ways']}-way {s['shots']}-shot, {s['queries']} queries, T = {s['steps']} on "
            f"{batch}, {s['filters']} filters, meta-batch {s['meta_batch']}, "
            f"{s['episode_batch']} episode(s) per batched pass, "
            f"{'second' if s['second_order'] else 'first'}-order, {s['device']} "
            f"({s['threads']} threads), meta-learner step: {s['step_kernels']}, learner "
            f"block: {s['block_kernels']}, convolutions' weight gradient: {s['conv_kernels']}; "
            f"first episode {result['first_episode_s']:.3f} s"
        )
        print(
            f"seconds per episode: {s_per_episode:.4f} (median of {calls * per_call}; "
            f"process CPU seconds {cpu_per_episode:.4f})"
        )
        print(f"episodes per second: {result['episodes_per_s']:.2f}")
        print(f"GFLOP per episode (estimated): {gflop:.2f}")
        print(f"achieved GFLOP/s: {result['gflops']:.1f}")
        print(f"peak memory: {result['peak_memory_mb']:.0f} MB")
    return result


def _time_calls(
    run: Callable[[], None], count: int, device: torch.device
) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of ``count`` calls of ``run``."""
    times = []
    for _ in range(count):
        _synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        run()
        _synchronize(device)
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times
