"""Write a run's best checkpoint as a shipped meta-learner (``src/metalstm/pretrained/NAME``).

The shipped file holds the model's tensors and metadata (no optimiser state). ``--set`` changes
evaluation settings, so one meta-training can ship under several test presets when the presets
share it: with a head built per episode (``head_init``) the meta-learned weights fit any N, so
``omniglot-20w1s`` ships the ``omniglot-5w1s`` run with ``n_way=20``. The metadata records the
run it came from and what was changed.

    python benchmarks/ship_checkpoint.py runs/omniglot-5w1s omniglot-20w1s --set n_way=20

The source may be a shipped name: its weights ship again with the changed settings, the metadata
keeping the run they were trained in and every change made since. ``--into DIR`` writes the same
model-only file elsewhere, e.g. beside a comparison's results, so that a later ``compare`` reuses
that run (``--checkpoint METHOD=DIR/NAME.safetensors``) instead of training it again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from metalstm.checkpoint import save_checkpoint
from metalstm.serialization import load_method, method_meta, method_tensors

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "metalstm" / "pretrained"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder (its best checkpoint) or checkpoint")
    parser.add_argument("name", help="shipped name, e.g. omniglot-5w1s")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--eval", type=Path, help="its `metalstm evaluate --out` JSON: the figure shipped with it"
    )
    parser.add_argument(
        "--into",
        type=Path,
        default=PRETRAINED,
        help="folder to write NAME.safetensors in (default: the package's shipped checkpoints; "
        "e.g. a compare's results folder, whose runs a later compare reuses with --checkpoint)",
    )
    args = parser.parse_args()
    changes = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    model, meta = load_method(args.run, **changes)
    # re-shipping a shipped checkpoint with other settings keeps the run it was trained in
    extra = {
        "trained_in": meta.get("trained_in", str(args.run)),
        "train_state": meta.get("train_state"),
        "set": {**meta.get("set", {}), **changes},
    }
    if args.eval is not None:
        extra["test"] = test_figure(json.loads(args.eval.read_text()))
    out = method_meta(model, "training", **extra)
    out["config"]["device"] = meta["config"]["device"]  # as trained, not the loading device
    path = save_checkpoint(args.into / args.name, method_tensors(model), out)
    print(f"wrote {path}")


def test_figure(result: dict[str, Any]) -> dict[str, Any]:
    """What ``metalstm presets`` prints: accuracy, 95% CI, episodes and protocol line."""
    return {key: result[key] for key in ("accuracy", "ci95", "episodes", "protocol")}


if __name__ == "__main__":
    main()
