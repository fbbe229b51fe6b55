"""``metalstm train``: meta-train a model into a run folder, or resume a run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import MetaLSTMError, printable
from . import Subparsers


def register(subparsers: Subparsers) -> None:
    train = subparsers.add_parser("train", help="meta-train a model into a run folder")
    start = train.add_mutually_exclusive_group(required=True)
    start.add_argument("--preset", help="named preset (see metalstm presets)")
    start.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    train.add_argument("--out", metavar="RUN_DIR", help="run folder for a new run")
    train.add_argument(
        "--method",
        help="train this method with its own recipe on the preset's data and test episodes, "
        "as compare does (default: the preset's method and recipe)",
    )
    train.add_argument("--episodes", type=int, help="meta-training episodes")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--data-root", help="data folder (default: $METALSTM_DATA)")
    train.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="override a config field"
    )
    train.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    train.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> None:
    from ..config import load_preset, override, parse_overrides, with_recipe
    from ..distributed import Distributed
    from ..training import resume, train
    from ..util import resolve_device

    log = None if args.quiet else sys.stderr
    if args.resume:
        if args.preset or args.set or args.seed is not None or args.method:
            raise MetaLSTMError(
                "--resume takes the run's own config; drop --preset/--method/--set/--seed"
            )
        config_device = "auto"
        dist = Distributed.from_environment(resolve_device(config_device))
        trainer = resume(args.resume, episodes=args.episodes, dist=dist, log=log)
    else:
        if not args.out:
            raise MetaLSTMError("train --preset needs --out RUN_DIR (the folder for the run)")
        values: dict[str, Any] = parse_overrides(args.set)
        for key in ("episodes", "seed", "data_root"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        # With --method, the preset takes the values it has (the recipe may read them), and the
        # method's recipe then takes them all, its own settings included.
        config = override(load_preset(args.preset), values, strict=not args.method)
        if args.method:
            config = override(with_recipe(config, args.method), values)
        dist = Distributed.from_environment(resolve_device(config.device))
        trainer = train(config, args.out, force=args.force, dist=dist, log=log)
    dist.close()
    state = trainer.state
    if dist.is_main:
        best = (
            f"best validation accuracy {100 * state.best_accuracy:.2f} % at episode "
            f"{state.best_step * trainer.config.meta_batch}"
            if state.best_accuracy >= 0
            else "no validation yet"
        )
        print(
            f"{state.stopped}: {state.step * trainer.config.meta_batch} episodes in "
            f"{state.elapsed:.1f} s ({state.cpu_seconds:.1f} s of CPU on "
            f"{' then '.join(state.machines)}); {best}; checkpoints in "
            f"{printable(str(trainer.run_dir))}"
        )
    if state.stopped == "interrupted":
        raise SystemExit(130)
