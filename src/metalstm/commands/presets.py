"""``metalstm presets``: the named presets, and which ship a trained meta-learner."""

from __future__ import annotations

import argparse
import json

from . import Subparsers


def register(subparsers: Subparsers) -> None:
    presets = subparsers.add_parser(
        "presets", help="list the named presets and which ship a trained meta-learner"
    )
    presets.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> None:
    from ..checkpoint import list_pretrained
    from ..config import load_preset, preset_names

    rows = {name: load_preset(name).to_dict() for name in preset_names()}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    shipped = set(list_pretrained())
    for name, cfg in rows.items():
        print(
            f"{name:<20} {cfg['dataset']}/{cfg['split']} {cfg['n_way']}-way {cfg['k_shot']}-shot "
            f"{cfg['method']} T={cfg['settings'].get('inner_steps', '-')} "
            f"filters={cfg['filters']} episodes={cfg['episodes']}"
            + ("  [trained meta-learner ships: --checkpoint NAME]" if name in shipped else "")
        )
