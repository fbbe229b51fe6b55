"""``metalstm methods``: the registered methods, what they train on and their settings."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import Subparsers


def register(subparsers: Subparsers) -> None:
    methods = subparsers.add_parser(
        "methods", help="list the registered methods, what they train on and their settings"
    )
    methods.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from ..registry import method_entry, method_names

    rows: dict[str, dict[str, Any]] = {}
    for name in method_names():
        entry = method_entry(name)
        rows[name] = {
            "title": entry.title,
            "trains_on": entry.trains_on.value,
            "settings": asdict(entry.settings()),
            "uses_training_of": entry.uses_training_of,
        }
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for name, row in rows.items():
        settings = " ".join(f"{k}={v}" for k, v in row["settings"].items()) or "(no settings)"
        print(f"{name:<14} {row['title']:<40} trains on {row['trains_on']:<8} {settings}")
