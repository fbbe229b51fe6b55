"""The commands of the ``metalstm`` command line, one module per command.

Each module exposes ``register(subparsers)``, which adds the command's parser (its help text and
options), and ``run(args)``, which carries it out over the Python API, importing what it needs
there so that the command line starts fast. :mod:`metalstm.cli` lists the modules in the order
``metalstm --help`` shows them: adding a command is one module here and one line there. Options
shared by several commands live here.
"""

from __future__ import annotations

import argparse

#: What ``ArgumentParser.add_subparsers`` returns: the argument of every ``register``.
Subparsers = argparse._SubParsersAction


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--checkpoint`` option of the commands that load one (resolved by
    :func:`metalstm.checkpoint.resolve_checkpoint`)."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH_OR_NAME",
        help="a .safetensors checkpoint, a run folder, or the name of a shipped meta-learner",
    )
