"""``metalstm bench``: throughput on synthetic images; its options and the benchmark itself are
those of :mod:`metalstm.bench`, which scripts reuse."""

from __future__ import annotations

import argparse

from ..bench import add_bench_arguments, bench_main
from . import Subparsers


def register(subparsers: Subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="meta-training or evaluation throughput on synthetic images"
    )
    add_bench_arguments(bench)


def run(args: argparse.Namespace) -> None:
    bench_main(args)
