"""Command-line interface: a thin layer over the Python API.

Every command exits 0 on success and 2 on a usage or input error, printing one line that says what
is wrong and how to fix it (no traceback); a reader of its output that goes away (``metalstm
methods | head``) ends it quietly, as it does other Unix tools (exit 141). Commands that report
results take ``--json``. Each command is a module of :mod:`metalstm.commands` (its parser and its
run); :data:`COMMANDS` lists them in the order of ``metalstm --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .allocator import keep_freed_memory
from .commands import bench, compare, data, evaluate, methods, plot, predict, presets, train
from .errors import MetaLSTMError, printable

COMMANDS = (data, train, evaluate, compare, bench, predict, presets, methods, plot)


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
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # no page faults for every episode's tensors (see metalstm.allocator)
    run = {command.__name__.rpartition(".")[2]: command.run for command in COMMANDS}
    try:
        run[args.command](args)
    except MetaLSTMError as error:
        print(f"metalstm: error: {printable(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalstm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that raises nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as the shell reports it
    return 0
