"""How far runs of the same preset drift apart with the thread count and the process count.

For each preset: ``metalstm train --preset P --episodes 24 --seed 3 --set meta_batch=4`` (six
updates) with 1 thread, with 2 threads, and as 2 gloo processes of 1 thread each (torchrun), then
the largest |Δ| over every meta-parameter of ``last.safetensors`` against the 1-thread run.
Prints one table row per preset (the machine's CPU first). README "Reproducibility" shows its
output. Example::

    METALSTM_DATA=../shared/data python benchmarks/reproducibility.py --presets omniglot-5w1s-paper
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from metalstm.checkpoint import load_checkpoint
from metalstm.machine import cpu_name

# The paper's recipe, whose runs agree across thread counts to rounding (README
# "Reproducibility"); the library's recipe with a head built per episode drifted by 1.0e-4 after
# six updates on the Xeon (its 32-filter, T = 8 version); 0 on a Zen 3 EPYC (session 31).
PRESETS = tuple(f"omniglot-{s}-paper" for s in ("5w1s", "5w5s", "20w1s", "20w5s"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train(preset: str, out: Path, threads: int, processes: int, episodes: int) -> None:
    args = ["-m", "metalstm", "train", "--preset", preset, "--out", str(out), "--quiet"]
    args += ["--episodes", str(episodes), "--seed", "3", "--set", "meta_batch=4"]
    args += ["--set", "val_episodes=2"]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        args = launcher + args
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)


def max_difference(a: Path, b: Path) -> float:
    ta, _ = load_checkpoint(a / "last.safetensors")
    tb, _ = load_checkpoint(b / "last.safetensors")
    keys = [k for k in ta if k.startswith("model.")]
    return max(float((ta[k] - tb[k]).abs().max()) for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--episodes", type=int, default=24)
    args = parser.parse_args()
    print(f"# {cpu_name()}, torch {torch.__version__}; {args.episodes} episodes, meta_batch 4")
    print("| preset | 1 vs 2 threads: max abs diff | 1 vs 2 processes: max abs diff |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            runs = {}
            for name, threads, processes in (("t1", 1, 1), ("t2", 2, 1), ("p2", 1, 2)):
                runs[name] = Path(tmp) / f"{preset}-{name}"
                train(preset, runs[name], threads, processes, args.episodes)
            threads_diff = max_difference(runs["t1"], runs["t2"])
            process_diff = max_difference(runs["t1"], runs["p2"])
            print(f"| {preset} | {threads_diff:.1e} | {process_diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
