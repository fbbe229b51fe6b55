"""Memory soak: meta-train many episodes and check that resident memory does not grow.

Prints the resident set size (RSS) after the warm-up, at the end, and the least-squares slope in
KiB per 100 episodes over the run (a leak of a graph or history per episode shows as a clear
positive slope). Usage::

    METALSTM_DATA=../shared/data python benchmarks/soak.py --episodes 2000 [--preset omniglot-5w1s]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from metalstm import load_preset, override
from metalstm.config import parse_overrides
from metalstm.training import Trainer


def rss_kib() -> int:
    """Current resident set size of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="omniglot-5w1s")
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--every", type=int, default=50, help="episodes between RSS samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    config = override(
        load_preset(args.preset),
        {
            "episodes": args.episodes,
            "val_interval": 10**9,
            "val_episodes": 10,
            **parse_overrides(args.set),
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "soak"
        run_dir.mkdir()
        trainer = Trainer(config, run_dir, log=None)
        samples: list[tuple[int, int]] = []
        for step in range(args.episodes):
            trainer.update(step)
            trainer.state.step = step + 1
            if step + 1 >= args.warmup and (step + 1) % args.every == 0:
                samples.append((step + 1, rss_kib()))
                print(f"episode {step + 1}: RSS {samples[-1][1] / 1024:.1f} MiB", flush=True)
    xs = [float(s) for s, _ in samples]
    ys = [float(r) for _, r in samples]
    result = {
        "preset": args.preset,
        "episodes": args.episodes,
        "rss_start_mib": ys[0] / 1024,
        "rss_end_mib": ys[-1] / 1024,
        "slope_kib_per_100_episodes": 100 * slope(xs, ys),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"RSS after {int(xs[0])} episodes: {result['rss_start_mib']:.1f} MiB")
        print(f"RSS after {int(xs[-1])} episodes: {result['rss_end_mib']:.1f} MiB")
        print(f"slope: {result['slope_kib_per_100_episodes']:.1f} KiB per 100 episodes")


if __name__ == "__main__":
    main()
