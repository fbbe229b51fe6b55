"""The ``metalstm compare`` command: its options, the parsed request, the method list."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..errors import ConfigError
from ..registry import method_names


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``metalstm compare``."""
    parser.add_argument("--preset", required=True, help="named preset (see metalstm presets)")
    parser.add_argument(
        "--methods",
        default="all",
        help="comma-separated methods, or all (every registered method; see metalstm methods)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for runs and results")
    parser.add_argument(
        "--checkpoint",
        metavar="METHOD=PATH",
        action="append",
        default=[],
        help="use this checkpoint for METHOD instead of training it (repeatable)",
    )
    parser.add_argument("--episodes", type=int, help="test episodes (default: 600)")
    parser.add_argument("--seed", type=int, help="seed of the fixed test episodes (default: 0)")
    parser.add_argument(
        "--set",
        metavar="[METHOD:]KEY=VALUE",
        action="append",
        default=[],
        help="override a config field for every method, or for METHOD only",
    )
    parser.add_argument(
        "--train-episodes",
        type=int,
        metavar="N",
        help="training length of every method: N episodes (N mini-batches when pre-training)",
    )
    parser.add_argument("--data-root", help="data folder (default: $METALSTM_DATA)")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines (training and evaluation)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


@dataclass(frozen=True)
class Request:
    """A parsed ``metalstm compare`` command."""

    preset: str
    methods: tuple[str, ...]
    out: Path
    checkpoints: dict[str, str]
    episodes: int | None = None
    seed: int | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    train_episodes: int | None = None
    data_root: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Request:
        overrides: dict[str, str] = {}
        per_method: dict[str, dict[str, str]] = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r} is not of the form [METHOD:]key=value")
            method, colon, key = key.strip().rpartition(":")
            if colon:
                check_method(method)
                per_method.setdefault(method, {})[key.strip()] = value.strip()
            else:
                overrides[key.strip()] = value.strip()
        checkpoints = {}
        for item in args.checkpoint:
            method, sep, path = item.partition("=")
            if not sep or not path.strip():
                raise ConfigError(f"--checkpoint {item!r} is not of the form METHOD=PATH")
            checkpoints[check_method(method.strip())] = path.strip()
        for name, value in (
            ("--episodes", args.episodes),
            ("--train-episodes", args.train_episodes),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value} must be 1 or more")
        if args.seed is not None and args.seed < 0:
            raise ConfigError(f"--seed {args.seed} must be 0 or more")
        return cls(
            preset=args.preset,
            methods=parse_methods(args.methods),
            out=Path(args.out),
            checkpoints=checkpoints,
            episodes=args.episodes,
            seed=args.seed,
            overrides=overrides,
            method_overrides=per_method,
            train_episodes=args.train_episodes,
            data_root=args.data_root,
        )

    def command(self) -> str:
        """The ``metalstm compare`` command line that reproduces this request."""
        words = ["metalstm", "compare", "--preset", self.preset]
        words += ["--methods", ",".join(self.methods), "--out", str(self.out)]
        if self.episodes is not None:
            words += ["--episodes", str(self.episodes)]
        if self.seed is not None:
            words += ["--seed", str(self.seed)]
        if self.train_episodes is not None:
            words += ["--train-episodes", str(self.train_episodes)]
        for key, value in self.overrides.items():
            words += ["--set", f"{key}={value}"]
        for method, values in self.method_overrides.items():
            words += [w for k, v in values.items() for w in ("--set", f"{method}:{k}={v}")]
        for method, path in self.checkpoints.items():
            words += ["--checkpoint", f"{method}={path}"]
        return shlex.join(words)


def check_method(name: str) -> str:
    if name not in method_names():
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())} (or all)")
    return name


def parse_methods(text: str) -> tuple[str, ...]:
    """``all`` or a comma-separated list of method names, in the table's order, no repeats."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        example = ",".join(method_names()[-2:])
        raise ConfigError(f"--methods is empty; give all or a list like {example}")
    if names == ["all"]:
        return method_names()
    chosen = {check_method(n) for n in names}
    return tuple(m for m in method_names() if m in chosen)


def say(log: TextIO | None, message: str) -> None:
    if log is not None:
        print(message, file=log, flush=True)
