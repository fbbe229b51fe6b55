"""``metalstm methods``: the registered methods, what they train on and their settings; with
``--preset``, the recipe each one trains with there (what ``compare --preset`` trains) and its
published figure."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import Subparsers


def register(subparsers: Subparsers) -> None:
    methods = subparsers.add_parser(
        "methods",
        help="list the registered methods, what they train on and their settings",
        description=__doc__,
    )
    methods.add_argument(
        "--preset",
        help="also give each method's recipe on this preset (the settings of its own paper that "
        "`compare --preset` trains it with) and the figure its paper published there",
    )
    methods.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from ..config import load_preset, recipe_values
    from ..registry import method_entry, method_names

    preset = load_preset(args.preset) if args.preset else None
    rows: dict[str, dict[str, Any]] = {}
    for name in method_names():
        entry = method_entry(name)
        row = rows[name] = {
            "title": entry.title,
            "reference": entry.reference,
            "trains_on": entry.trains_on.value,
            "settings": asdict(entry.settings()),
            "uses_training_of": entry.uses_training_of,
        }
        if preset is not None:
            row["recipe"] = recipe_values(preset, name)
            row["published"] = entry.published_on(preset)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if preset is not None:
        print(f"recipes on {args.preset} (what `metalstm compare --preset {args.preset}` trains):")
    for name, row in rows.items():
        if preset is None:
            settings = " ".join(f"{k}={v}" for k, v in row["settings"].items()) or "(no settings)"
            print(f"{name:<14} {row['title']:<40} trains on {row['trains_on']:<8} {settings}")
            continue
        print(f"{name:<14} {row['title']}{_source(row)}")
        print(f"{'':<14} {_recipe(name, row, preset.method)}")


def _source(row: dict[str, Any]) -> str:
    """`` (reference; published P %)`` as far as either is known."""
    parts = [row["reference"]] if row["reference"] else []
    if row["published"] is not None:
        parts.append(f"published {row['published']:g} %")
    return f" ({'; '.join(parts)})" if parts else ""


def _recipe(name: str, row: dict[str, Any], preset_method: str) -> str:
    if row["uses_training_of"]:
        return f"trained as {row['uses_training_of']} (the same training)"
    if row["trains_on"] == "nothing":
        return "nothing to train"
    if row["recipe"]:
        return " ".join(f"{k}={v}" for k, v in row["recipe"].items())
    if name == preset_method:
        return "the preset's own settings"
    return "the preset's schedule and episodes, the method's default settings"
