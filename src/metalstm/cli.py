"""Command-line interface: a thin layer over the Python API.

Every command exits 0 on success and 2 on a usage or input error, printing one line that says what
is wrong and how to fix it (no traceback). Commands that report results take ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .bench import add_bench_arguments, bench_main
from .checkpoint import add_checkpoint_argument
from .compare import add_compare_arguments, compare_main
from .errors import MetaLSTMError, printable
from .files import check_output, output_path, write_file
from .predict import add_predict_arguments, predict_main


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="metalstm",
        description="Few-shot image classification with the LSTM meta-learner "
        "(Ravi & Larochelle, ICLR 2017).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"metalstm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    data = commands.add_parser("data", help="find, download and verify data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    verify = data_commands.add_parser("verify", help="check a data set and print its counts")
    verify.add_argument("dataset", choices=["omniglot"])
    verify.add_argument("--data-root", help="folder holding omniglot/ (default: $METALSTM_DATA)")
    verify.add_argument("--json", action="store_true", help="print the counts as JSON")

    train = commands.add_parser("train", help="meta-train a model into a run folder")
    start = train.add_mutually_exclusive_group(required=True)
    start.add_argument("--preset", help="named preset (see metalstm presets)")
    start.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    train.add_argument("--out", metavar="RUN_DIR", help="run folder for a new run")
    train.add_argument("--episodes", type=int, help="meta-training episodes")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--data-root", help="data folder (default: $METALSTM_DATA)")
    train.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="override a config field"
    )
    train.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    train.add_argument("--quiet", action="store_true", help="no progress line")

    evaluate = commands.add_parser("evaluate", help="accuracy on the fixed test episodes")
    add_checkpoint_argument(evaluate)
    evaluate.add_argument("--episodes", type=int, help="test episodes (default 600)")
    evaluate.add_argument("--seed", type=int, help="seed of the fixed test episodes (default 0)")
    evaluate.add_argument(
        "--split-part",
        default="test",
        choices=["train", "val", "test"],
        help="which part of the split to draw episodes from",
    )
    evaluate.add_argument("--steps", type=int, help="inner steps at test (default: as trained)")
    evaluate.add_argument(
        "--transductive",
        action="store_true",
        help="BN statistics from the query batch instead of the support set",
    )
    evaluate.add_argument(
        "--sgd-from-init",
        metavar="LR[,LR...]",
        help="ablation: plain SGD from the LSTM's learned θ_0 instead of its update rule "
        "(several steps: the best on validation episodes)",
    )
    evaluate.add_argument("--data-root", help="data folder (default: $METALSTM_DATA)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress line (on stderr)")
    evaluate.add_argument(
        "--out", type=output_path, help="also write the JSON result (per episode) here"
    )

    compare = commands.add_parser(
        "compare", help="the paper's comparison table: every method on identical episodes"
    )
    add_compare_arguments(compare)

    bench = commands.add_parser(
        "bench", help="meta-training or evaluation throughput on synthetic images"
    )
    add_bench_arguments(bench)

    predict = commands.add_parser(
        "predict", help="label your own images from a few labelled examples per class"
    )
    add_predict_arguments(predict)

    presets = commands.add_parser(
        "presets", help="list the named presets and which ship a trained meta-learner"
    )
    presets.add_argument("--json", action="store_true")

    methods = commands.add_parser(
        "methods", help="list the registered methods, what they train on and their settings"
    )
    methods.add_argument("--json", action="store_true")

    plot = commands.add_parser("plot", help="figures")
    plots = plot.add_subparsers(dest="plot_command", required=True, parser_class=ArgumentParser)
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
    return parser


# -- commands --------------------------------------------------------------------------------------
def cmd_data(args: argparse.Namespace) -> None:
    from .data import omniglot_counts

    counts = omniglot_counts(args.data_root)
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    print(f"{'set':<20}{'alphabets':>10}{'characters':>12}{'images':>9}")
    for name, row in counts.items():
        print(f"{name:<20}{row['alphabets']:>10}{row['characters']:>12}{row['images']:>9}")


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_preset, override, parse_overrides
    from .distributed import Distributed
    from .training import resume, train
    from .util import resolve_device

    log = None if args.quiet else sys.stderr
    if args.resume:
        if args.preset or args.set or args.seed is not None:
            raise MetaLSTMError("--resume takes the run's own config; drop --preset/--set/--seed")
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
        config = override(load_preset(args.preset), values)
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
            f"{state.elapsed:.1f} s; {best}; checkpoints in {printable(str(trainer.run_dir))}"
        )
    if state.stopped == "interrupted":
        raise SystemExit(130)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate
    from .serialization import load_method
    from .util import resolve_device

    overrides: dict[str, Any] = {}
    if args.steps is not None:
        overrides["eval_inner_steps"] = args.steps
    if args.transductive:
        overrides["transductive"] = True
    if args.data_root is not None:
        overrides["data_root"] = args.data_root
    if args.out is not None:
        check_output(args.out)
    device = resolve_device(args.device)
    progress = None if args.quiet else sys.stderr
    algorithm, meta = load_method(args.checkpoint, device, **overrides)
    name = algorithm.name
    if args.sgd_from_init is not None:
        from .config import parse_positive_numbers
        from .methods.metalearner.ablation import sgd_from_learned_init

        ablation = sgd_from_learned_init(
            algorithm,
            parse_positive_numbers(args.sgd_from_init, "--sgd-from-init"),
            progress=progress,
        )
        algorithm = ablation.model
    result = evaluate(
        algorithm,
        part=args.split_part,
        episodes=args.episodes,
        seed=args.seed,
        progress=progress,
    )
    result.extra["checkpoint"] = meta["path"]
    result.extra["algorithm"] = name
    if args.sgd_from_init is not None:
        result.extra["update"] = ablation.describe()
    if args.out is not None:
        write_file(args.out, json.dumps(result.to_json(), indent=2))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.line())
        print(f"protocol: {result.protocol.describe()}")
        print(f"checkpoint: {printable(meta['path'])} ({name})")
        if "update" in result.extra:
            print(f"update: {result.extra['update']}")


def cmd_presets(args: argparse.Namespace) -> None:
    from .checkpoint import list_pretrained
    from .config import load_preset, preset_names

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


def cmd_methods(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .registry import method_entry, method_names

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


def cmd_plot(args: argparse.Namespace) -> None:
    from . import plots

    check_output(args.out)
    if args.plot_command == "curves":
        print(printable(str(plots.plot_curves(args.run, args.out))))
        return
    from .data import EpisodeSampler
    from .methods.metalearner import MetaLSTM
    from .serialization import load_method
    from .util import load_part

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


COMMANDS = {
    "data": cmd_data,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "presets": cmd_presets,
    "methods": cmd_methods,
    "predict": predict_main,
    "compare": compare_main,
    "bench": bench_main,
    "plot": cmd_plot,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except MetaLSTMError as error:
        print(f"metalstm: error: {printable(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalstm: interrupted", file=sys.stderr)
        return 130
    return 0
