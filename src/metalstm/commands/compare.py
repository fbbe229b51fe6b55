"""``metalstm compare``: the paper's comparison table; its options (with the request they make)
and the work are those of :mod:`metalstm.compare`."""

from __future__ import annotations

import argparse

from ..compare import add_compare_arguments, compare_main
from . import Subparsers


def register(subparsers: Subparsers) -> None:
    compare = subparsers.add_parser(
        "compare", help="the paper's comparison table: every method on identical episodes"
    )
    add_compare_arguments(compare)


def run(args: argparse.Namespace) -> None:
    compare_main(args)
