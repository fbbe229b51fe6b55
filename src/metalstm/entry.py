"""The ``metalstm`` command's entry point: :func:`metalstm.cli.main`, with a Ctrl-C that arrives
while the CLI's modules (and torch) are still loading handled like any other (exit 130)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("metalstm: interrupted", file=sys.stderr)
        return 130
    return cli_main(argv)
