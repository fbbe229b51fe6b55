"""``metalstm evaluate``: accuracy of a checkpoint on the fixed test episodes, with its protocol."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import ConfigError, printable
from ..files import check_output, output_path, write_file
from . import Subparsers, add_checkpoint_argument


def register(subparsers: Subparsers) -> None:
    evaluate = subparsers.add_parser("evaluate", help="accuracy on the fixed test episodes")
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
        "--n-way",
        type=int,
        help="classes per test episode (default: as trained; a model whose head is built per "
        "episode, head_init=prototypes, takes any)",
    )
    evaluate.add_argument(
        "--k-shot", type=int, help="support images per class (default: as trained)"
    )
    evaluate.add_argument(
        "--transductive",
        action="store_true",
        help="BN statistics from the query batch instead of the support set",
    )
    evaluate.add_argument(
        "--query-bn",
        choices=["support", "final"],
        help="BN statistics of the queries (inner-loop methods): the support passes' (the "
        "authors') or those with one more support pass at θ_T (default: as trained)",
    )
    evaluate.add_argument(
        "--sgd-from-init",
        metavar="LR[,LR...]",
        help="ablation: plain SGD from the LSTM's learned θ_0 instead of its update rule "
        "(several steps: the best on validation episodes)",
    )
    evaluate.add_argument(
        "--episode-batch",
        type=int,
        help="episodes adapted as one batched pass of the learner (lstm, maml, maml-fo; the "
        "same mathematics, other float rounding; default 1: one at a time)",
    )
    evaluate.add_argument("--data-root", help="data folder (default: $METALSTM_DATA)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress line (on stderr)")
    evaluate.add_argument(
        "--out", type=output_path, help="also write the JSON result (per episode) here"
    )


def run(args: argparse.Namespace) -> None:
    from ..evaluation import episode_batch, evaluate
    from ..inner_loop import InnerLoopSettings
    from ..serialization import load_method
    from ..util import resolve_device

    given = {
        "eval_inner_steps": args.steps,
        "n_way": args.n_way,
        "k_shot": args.k_shot,
        "transductive": args.transductive or None,
        "query_bn": args.query_bn,
        "data_root": args.data_root,
        "episode_batch": args.episode_batch,
    }
    overrides: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    if args.episode_batch is not None and args.episode_batch < 1:
        raise ConfigError(f"--episode-batch {args.episode_batch} is invalid; use 1 or more")
    if args.out is not None:
        check_output(args.out)
    device = resolve_device(args.device)
    progress = None if args.quiet else sys.stderr
    method, meta = load_method(args.checkpoint, device, **overrides)
    name = method.name
    if args.query_bn is not None and not isinstance(method.settings, InnerLoopSettings):
        raise ConfigError(
            f"--query-bn applies to a method that adapts by an inner loop (lstm, maml), not "
            f"{name!r}: its queries are normalised with the support set's statistics at the "
            "one θ it has"
        )
    if args.sgd_from_init is not None:
        from ..config import parse_positive_numbers
        from ..methods.metalearner.ablation import sgd_from_learned_init

        ablation = sgd_from_learned_init(
            method,
            parse_positive_numbers(args.sgd_from_init, "--sgd-from-init"),
            progress=progress,
        )
        method = ablation.model
    result = evaluate(
        method,
        part=args.split_part,
        episodes=args.episodes,
        seed=args.seed,
        progress=progress,
    )
    result.extra["checkpoint"] = meta["path"]
    result.extra["algorithm"] = name
    if episode_batch(method) > 1:
        result.extra["episode_batch"] = episode_batch(method)
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
