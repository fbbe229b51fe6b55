"""``metalstm plot gates`` and ``metalstm plot curves``: the meta-learner's gates, and the
training and validation curves of runs, as PNG figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MetaLSTMError, printable
from ..files import check_output, output_path
from . import Subparsers, add_checkpoint_argument


def register(subparsers: Subparsers) -> None:
    plot = subparsers.add_parser("plot", help="figures")
    plots = plot.add_subparsers(dest="plot_command", required=True)
    gates = plots.add_parser("gates", help="σ(i) and σ(f) per learner layer across inner steps")
    add_checkpoint_argument(gates)
    gates.add_argument("--out", type=output_path, required=True, help="PNG file to write")
    gates.add_argument("--episodes", type=int, default=100, help="validation episodes to average")
    gates.add_argument("--data-root", help="data folder (default: $METALSTM_DATA)")
    curves = plots.add_parser("curves", help="training and validation curves of runs")
    curves.add_argument(
        "--run",
        type=Path,
        required=True,
        action="append",
        help="run folder; repeat it to compare runs in one figure",
    )
    curves.add_argument("--out", type=output_path, required=True, help="PNG file to write")


def run(args: argparse.Namespace) -> None:
    from .. import plots

    check_output(args.out)
    if args.plot_command == "curves":
        print(printable(str(plots.plot_curves(args.run, args.out))))
        return
    from ..data import EpisodeSampler
    from ..methods.metalearner import MetaLSTM
    from ..serialization import load_method
    from ..util import load_part

    overrides = {"data_root": args.data_root} if args.data_root else {}
    model, meta = load_method(args.checkpoint, **overrides)
    if not isinstance(model, MetaLSTM):
        raise MetaLSTMError(f"{meta['path']} is a {model.name!r} model; gates need an LSTM one")
    cfg = model.config
    sampler = EpisodeSampler(
        load_part(cfg, "val"), cfg.n_way, cfg.k_shot, cfg.eval_queries, cfg.val_seed
    )
    gates = plots.collect_gates(model, sampler, args.episodes)
    title = (
        f"Meta-learner gates, {cfg.dataset} {cfg.n_way}-way {cfg.k_shot}-shot "
        f"({args.episodes} validation episodes; mean and 10-90th percentile)"
    )
    print(printable(str(plots.plot_gates(gates, args.out, title))))
