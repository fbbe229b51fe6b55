"""``metalstm presets``: the named presets, and which ship a trained meta-learner (with the test
figure recorded in it)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import Subparsers


def register(subparsers: Subparsers) -> None:
    presets = subparsers.add_parser(
        "presets", help="list the named presets and which ship a trained meta-learner"
    )
    presets.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> None:
    from ..checkpoint import list_pretrained, read_checkpoint_meta, resolve_checkpoint
    from ..config import load_preset, preset_names

    rows = {name: load_preset(name).to_dict() for name in preset_names()}
    shipped = set(list_pretrained())
    figures = {
        name: read_checkpoint_meta(resolve_checkpoint(name)).get("test")
        for name in rows
        if name in shipped
    }
    if args.json:
        print(
            json.dumps(
                {name: {**cfg, "shipped": figures.get(name)} for name, cfg in rows.items()},
                indent=2,
            )
        )
        return
    for name, cfg in rows.items():
        print(
            f"{name:<20} {cfg['dataset']}/{cfg['split']} {cfg['n_way']}-way {cfg['k_shot']}-shot "
            f"{cfg['method']} T={cfg['settings'].get('inner_steps', '-')} "
            + training_shape(cfg)
            + f"filters={cfg['filters']} episodes={cfg['episodes']}"
            + (f"  [ships: {shipped_figure(figures[name])}]" if name in shipped else "")
        )


def training_shape(cfg: dict[str, Any]) -> str:
    """``trained 60-way 1-shot `` if meta-training episodes differ from the test's, else ``""``."""
    ways, shots = cfg.get("train_n_way"), cfg.get("train_k_shot")
    if not ways and not shots:
        return ""
    return f"trained {ways or cfg['n_way']}-way {shots or cfg['k_shot']}-shot "


def shipped_figure(test: dict[str, Any] | None) -> str:
    """``98.27 ± 0.40 % on 600 test episodes``, as recorded in the shipped checkpoint."""
    if not isinstance(test, dict):
        return "trained meta-learner, --checkpoint NAME"
    accuracy, ci95 = 100 * test["accuracy"], 100 * test["ci95"]
    return f"{accuracy:.2f} ± {ci95:.2f} % on {test['episodes']} test episodes"
