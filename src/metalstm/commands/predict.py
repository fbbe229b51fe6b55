"""``metalstm predict``: label the images of query folders or files from a support folder of
labelled examples (the work is :func:`metalstm.predict.predict_folders`); the outputs (CSV or
JSON table, PNG grid) are all rendered and checked before the first is written."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError, DataError, printable
from ..files import check_output, output_path, write_file
from . import Subparsers, add_checkpoint_argument

OUTPUT_SUFFIXES = (".csv", ".json")


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="label your own images from a few labelled examples per class"
    )
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--support",
        required=True,
        metavar="DIR",
        help="folder with one sub-folder of images per class (the folder name is the label); "
        "any number of images per class, at most as many classes as the checkpoint's n_way",
    )
    parser.add_argument(
        "--query",
        required=True,
        nargs="+",
        metavar="DIR_OR_FILE",
        help="images to label: folders (query/IMAGE or query/CLASS/IMAGE, where a folder named "
        "like a class gives the true label) and/or image files",
    )
    parser.add_argument(
        "--out",
        type=output_path,
        metavar="FILE",
        help="write one row per query image to FILE.csv or FILE.json",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the rows as a JSON list on stdout"
    )
    parser.add_argument(
        "--invert",
        default="auto",
        choices=["auto", "yes", "no"],
        help="invert the images (255 - x); auto: for Omniglot checkpoints when the support "
        "images are light on average (dark-on-light drawings). Default: auto",
    )
    parser.add_argument(
        "--visualize",
        type=output_path,
        metavar="FILE.png",
        help="write a PNG grid of the support images and the labelled query images",
    )
    parser.add_argument("--steps", type=int, help="inner steps of adaptation (default: as trained)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> None:
    """Run ``metalstm predict``; raises :class:`MetaLSTMError` (exit 2) on any bad input."""
    import torch

    from ..predict import predict_folders
    from ..predict.rendering import render_grid, render_table, summary
    from ..util import resolve_device

    if args.out is not None and args.out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {args.out} must end in .csv or .json (the output format)")
    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give a file name ending in .csv or .json")
    if args.visualize is not None and args.visualize.suffix.lower() != ".png":
        raise ConfigError(f"--visualize {args.visualize} must end in .png")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps} is invalid; give at least 1 inner step")
    for output in (args.out, args.visualize):
        if output is not None:
            check_output(output, error=ConfigError)
    device = resolve_device(args.device)
    result = predict_folders(
        args.checkpoint,
        args.support,
        args.query,
        invert=args.invert,
        steps=args.steps,
        device=device,
    )
    counts = torch.bincount(result.support_labels).tolist()
    k = f"{counts[0]}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    c, s = result.support_images.shape[1], result.support_images.shape[-1]
    print(
        f"checkpoint: {printable(result.checkpoint)}; support: {len(result.class_names)} classes "
        f"x {k} images; query: {len(result.files)} images; all converted to {s}x{s} "
        f"{'grayscale' if c == 1 else 'RGB'}",
        file=sys.stderr,
    )
    print(f"inversion: {result.inversion_reason}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)

    outputs = []
    if args.out is not None:
        outputs.append((args.out, render_table(result, args.out.suffix.lower()).encode()))
    if args.visualize is not None:
        outputs.append((args.visualize, render_grid(result)))
    _write_outputs(outputs)
    if args.json:
        print(json.dumps(result.rows(), ensure_ascii=False))
    else:  # file and class names come from the user's folders: escape control characters
        print("\n".join(printable(line) for line in summary(result).split("\n")))
    for path, _ in outputs:
        print(f"wrote {printable(str(path))}", file=sys.stderr)


def _write_outputs(outputs: list[tuple[Path, bytes]]) -> None:
    """Write each output atomically; all are rendered (and checked) before the first is written."""
    for path, data in outputs:
        write_file(path, data, error=DataError)
