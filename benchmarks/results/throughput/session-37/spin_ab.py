"""Alternating rounds of ``metalstm bench`` (28x28, batches of 8) under OpenMP wait settings.

Usage: ``python spin_ab.py ROUNDS EPISODES`` (session 37 ran ``3 24``); prints each call's
seconds per episode, then the median and minimum of every workload and setting.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
WORKLOADS = {"28g": ["--channels", "1"], "28rgb": ["--channels", "3"]}


def seconds_per_episode(workload: list[str], env: dict[str, str], episodes: str) -> float:
    command = [sys.executable, "-m", "metalstm", "bench", "--image-size", "28", *workload]
    command += ["--meta-batch", "8", "--episode-batch", "8", "--episodes", episodes]
    command += ["--warmup", "8", "--json"]
    environment = {**os.environ, **env}
    out = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["s_per_episode"])


def main() -> None:
    rounds, episodes = int(sys.argv[1]), sys.argv[2]
    times: dict[tuple[str, str], list[float]] = {(s, w): [] for s in SETTINGS for w in WORKLOADS}
    for round_ in range(rounds):
        for workload, flags in WORKLOADS.items():
            for setting, env in SETTINGS.items():
                seconds = seconds_per_episode(flags, env, episodes)
                times[(setting, workload)].append(seconds)
                print(round_, workload, setting, f"{seconds:.4f}", flush=True)
    for (setting, workload), values in times.items():
        every = " ".join(f"{t:.4f}" for t in values)
        median, least = statistics.median(values), min(values)
        print(f"{workload:6s} {setting:8s} median {median:.4f} min {least:.4f} all {every}")


if __name__ == "__main__":
    main()
