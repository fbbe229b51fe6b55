"""``metalstm compare``: the paper's comparison table, every method on the same fixed test episodes.

For a preset (say ``omniglot-5w1s``) and a list of methods (:data:`METHODS`), this

The package follows the seams of the job: :mod:`.request` (options), :mod:`.configs` (each
method's config, progress), :mod:`.training` (checkpoints), :mod:`.evaluation` (identical
episodes) and :mod:`.reports` (the files).

1. trains what needs training, each method in ``OUT/runs/METHOD`` through the shared
   :class:`~metalstm.training.Trainer` (a finished run there with the same config is reused, an
   interrupted one resumed), unless ``--checkpoint METHOD=PATH`` gives its checkpoint.
   a method registered with ``uses_training_of`` reuses that method's training; one with nothing
   to train gets an untrained checkpoint;
2. evaluates every method on the *same* fixed test episodes, drawing them through one recording
   sampler per method and checking that the episodes each method saw (classes and image ids)
   hash to the same fingerprint (:func:`metalstm.data.episodes_fingerprint`); under the
   non-transductive protocol, a method whose query statistics come from the episode is evaluated
   once more with transductive batch norm, the protocol of several published figures;
3. writes ``OUT/results.md`` (Markdown table: mean ± 95% CI, the transductive figure beside it,
   episodes, training wall and CPU time, published figure; protocol line, command and the
   machine),
   ``results.csv``, ``results.json`` (with every per-episode accuracy) and ``results.png``
   (bar chart, error bars = 95% CI).

Methods come from the registry (:mod:`metalstm.registry`), in its order. Settings: the preset,
then the method's recipe (registered with the method), then ``--set key=value`` (every
method), then ``--set METHOD:key=value`` (one method), then ``--train-episodes``. Every method's
checkpoint also works with ``metalstm evaluate --checkpoint``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any, TextIO

from ..errors import ConfigError
from ..files import write_file
from ..machine import describe
from ..util import load_part, resolve_device
from .configs import ComparisonProgress, base_config, method_config, planned_work, train_image_count
from .evaluation import RecordingSampler, evaluate_methods
from .reports import csv_text, markdown, plot, results_json
from .request import Request, add_compare_arguments
from .training import given_checkpoint, prepare_methods, write_untrained

__all__ = [
    "RESULT_FILES",
    "ComparisonProgress",
    "RecordingSampler",
    "Request",
    "add_compare_arguments",
    "base_config",
    "compare",
    "compare_main",
    "given_checkpoint",
    "method_config",
    "write_untrained",
]


def compare(request: Request, log: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Train, evaluate and report; returns the content of ``results.json``."""
    if request.out.exists() and not request.out.is_dir():
        raise ConfigError(f"--out {request.out} is a file; give a folder")
    train_images = train_image_count(base_config(request))  # fails early on a bad preset or --set
    progress = ComparisonProgress(request.methods, planned_work(request, train_images))
    trained = prepare_methods(request, log, progress, train_images)
    results, fingerprint, base = evaluate_methods(request, trained, log, progress)
    test = load_part(base, "test")
    data_digest = hashlib.sha256(test.images.numpy().tobytes()).hexdigest()
    here = describe(resolve_device(base.device))
    payload = results_json(results, request, base, fingerprint, data_digest, here)
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "results.md", markdown(results, request, base, fingerprint, here))
    write_file(out / "results.csv", csv_text(results))
    write_file(out / "results.json", json.dumps(payload, indent=2) + "\n")
    title = (
        f"{request.preset}: {base.n_way}-way {base.k_shot}-shot, "
        f"{base.test_episodes} identical test episodes"
    )
    plot(results, out / "results.png", title, base.n_way)
    return payload


def compare_main(args: argparse.Namespace) -> None:
    """``metalstm compare``: prints the Markdown table (or the JSON with ``--json``)."""
    request = Request.from_args(args)
    payload = compare(request, log=None if args.quiet else sys.stderr)
    if args.json:
        print(json.dumps(payload))
    else:
        print((request.out / "results.md").read_text(), end="")
        print(f"written: {', '.join(str(request.out / f) for f in RESULT_FILES)}")


RESULT_FILES = ("results.md", "results.csv", "results.json", "results.png")
