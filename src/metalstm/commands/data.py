"""``metalstm data verify``: find (or download) a data set, check it and print its counts."""

from __future__ import annotations

import argparse
import json

from . import Subparsers


def register(subparsers: Subparsers) -> None:
    data = subparsers.add_parser("data", help="find, download and verify data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    verify = data_commands.add_parser("verify", help="check a data set and print its counts")
    verify.add_argument("dataset", choices=["omniglot"])
    verify.add_argument("--data-root", help="folder holding omniglot/ (default: $METALSTM_DATA)")
    verify.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(args: argparse.Namespace) -> None:
    from ..data import omniglot_counts

    counts = omniglot_counts(args.data_root)
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    print(f"{'set':<20}{'alphabets':>10}{'characters':>12}{'images':>9}")
    for name, row in counts.items():
        print(f"{name:<20}{row['alphabets']:>10}{row['characters']:>12}{row['images']:>9}")
