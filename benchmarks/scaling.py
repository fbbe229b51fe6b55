"""Data-parallel scaling on this machine: episodes/s of meta-training with 1 and with P processes
(torchrun, gloo), at the same global meta-batch, with intra-op threads split between processes.

Usage::

    METALSTM_DATA=../shared/data python benchmarks/scaling.py [--processes 2] [--episodes 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SUMMARY = re.compile(r"(\d+) episodes in ([0-9.]+) s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_seconds(processes: int, args: argparse.Namespace, out: Path) -> float:
    """Wall time of the training loop itself (as reported by metalstm train)."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = ["-m", "metalstm", "train", "--preset", args.preset, "--out", str(out), "--quiet"]
    command += ["--episodes", str(args.episodes), "--set", f"meta_batch={args.meta_batch}"]
    command += ["--set", f"val_interval={10**9}", "--set", "val_episodes=2"]
    if processes == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run"]
        launcher += ["--nproc_per_node", str(processes), "--master_addr", "127.0.0.1"]
        launcher += ["--master_port", str(free_port())]
    result = subprocess.run(launcher + command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    match = SUMMARY.search(result.stdout)
    if match is None:
        raise SystemExit(f"no summary line in: {result.stdout}")
    return float(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="omniglot-5w1s")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, args.processes):
            seconds = train_seconds(processes, args, Path(tmp) / f"p{processes}")
            rows.append({"processes": processes, "episodes_per_s": args.episodes / seconds})
    if args.json:
        print(json.dumps(rows))
        return
    print("| processes | episodes/s | speed-up |")
    print("| --- | --- | --- |")
    for row in rows:
        speedup = row["episodes_per_s"] / rows[0]["episodes_per_s"]
        print(f"| {row['processes']} | {row['episodes_per_s']:.2f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
