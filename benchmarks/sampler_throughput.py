"""Episode sampling throughput on the Omniglot ``vinyals`` train split (4112 classes).

Usage: ``python benchmarks/sampler_throughput.py [--episodes 5000] [--data-root DIR]``.
Prints episodes/s for 5-way 1-shot and 20-way 5-shot (15 queries per class), sampled from the
in-memory uint8 array exactly as training does (:meth:`EpisodeSampler.episode`).
"""

from __future__ import annotations

import argparse
import time

from metalstm.data import EpisodeSampler, load_split

SETTINGS = ((5, 1, 15), (20, 5, 15))


def throughput(sampler: EpisodeSampler, episodes: int) -> tuple[float, float]:
    """Episodes per wall-clock second and per CPU second, after a short warm-up.

    The CPU-second rate is what an otherwise idle core would give on a busy machine.
    """
    for step in range(50):
        sampler.episode(step)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(episodes):
        sampler.episode(step)
    return episodes / (time.perf_counter() - wall), episodes / (time.process_time() - cpu)


def main() -> None:
    """Load the split once, then time each setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=5000)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    data = load_split("omniglot", "vinyals", "train", data_root=args.data_root)
    print(f"loaded {data.n_classes} classes in {time.perf_counter() - start:.2f} s")
    for n_way, k_shot, q_query in SETTINGS:
        sampler = EpisodeSampler(data, n_way, k_shot, q_query, seed=0)
        wall, cpu = throughput(sampler, args.episodes)
        print(
            f"{n_way}-way {k_shot}-shot {q_query}-query: {wall:,.0f} episodes/s "
            f"({cpu:,.0f} per CPU second)"
        )


if __name__ == "__main__":
    main()
