"""The meta-learner's update rule as an optimizer for other models, against SGD and Adam.

The meta-learner LSTM was meta-trained to train the conv-4 learner (with batch norm) for T steps
on 5-way Omniglot tasks of the *training* characters. Here its learned rule
(:class:`metalstm.optim.MetaLSTMOptimizer`: both LSTM layers, not the learned initialisation)
trains two architectures it never saw, a 2-layer MLP and a 2-layer CNN without batch norm, on
5-way K-shot tasks built from Omniglot *test* characters (Vinyals split, unrotated), and is
compared with SGD and Adam at several learning rates for the same number of full-batch steps on
the same tasks from the same initial weights. The support loss and the query accuracy (the other
20 - K drawings of each character) are averaged over the tasks; the figure shows every setting
(the meta-learner has no learning rate to tune; the baselines get the best of their grid, chosen
on these very tasks, which favours them).

Usage::

    METALSTM_DATA=../shared/data python examples/optimizer_comparison.py \
        --checkpoint runs/omniglot/best --tasks 10 --steps 100 --out docs/optimizer_comparison.png \
        --json comparison.json
    python examples/optimizer_comparison.py --replot comparison.json   # redraw only
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalstm.data import load_split
from metalstm.methods.metalearner.optimizer import MetaLSTMOptimizer, learned_update_rule
from metalstm.serialization import load_method


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 5))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 5),
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "MLP 784-64-5": mlp,
    "CNN 2x(conv16, pool)": cnn,
}


def tasks(n_tasks: int, shots: int, seed: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """5-way tasks of unrotated Omniglot test characters: (support x, y, query x, y)."""
    data = load_split("omniglot", "vinyals", "test")
    classes = [c for c, name in enumerate(data.class_names) if name.endswith("rot000")]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_tasks):
        picked = rng.choice(classes, 5, replace=False)
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(picked):
            start, count = int(data.class_start[c]), int(data.class_count[c])
            order = rng.permutation(count) + start
            images = data.images[torch.from_numpy(order)].float() / 255
            sx.append(images[:shots])
            qx.append(images[shots:])
            sy += [label] * shots
            qy += [label] * (count - shots)
        out.append((torch.cat(sx), torch.tensor(sy), torch.cat(qx), torch.tensor(qy)))
    return out


def run(
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Support loss before each step and query accuracy after 0..steps steps."""
    torch.manual_seed(seed)
    model = make_model()
    optimizer = make_optimizer(list(model.parameters()))
    sx, sy, qx, qy = task
    losses, accuracies = [], []

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(sx), sy)
        loss.backward()
        return loss

    def query_accuracy() -> float:
        with torch.no_grad():
            return float((model(qx).argmax(-1) == qy).float().mean())

    accuracies.append(query_accuracy())
    for _ in range(steps):
        loss = float(torch.as_tensor(optimizer.step(closure)).detach())  # type: ignore[arg-type]
        losses.append(loss if np.isfinite(loss) else np.nan)
        accuracies.append(query_accuracy())
    return np.array(losses), np.array(accuracies)


def factory(
    kind: type[torch.optim.SGD] | type[torch.optim.Adam], lr: float
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: kind(params, lr=lr)


def plot(report: dict[str, Any], out: Path) -> None:
    """Support loss and query accuracy per step, every optimizer setting, one row per model."""
    curves_by_arch = report["curves"]
    trained_steps = report["trained_steps"]
    shades = {"SGD": ["#9ecae1", "#4292c6", "#08306b"], "Adam": ["#fc9272", "#cb181d"]}
    fig, axes = plt.subplots(
        len(curves_by_arch), 2, figsize=(12, 4.2 * len(curves_by_arch)), squeeze=False
    )
    for row_axes, (arch, curves) in zip(axes, curves_by_arch.items(), strict=True):
        seen = {"SGD": 0, "Adam": 0}
        for name, curve in curves.items():
            style: dict[str, Any]
            if name == "meta-learner":
                style = {"color": "black", "lw": 2.2}
            elif name.startswith("meta-learner"):
                style = {"color": "gray", "lw": 1.6, "ls": "--"}
            else:
                family = name.split()[0]
                palette = shades.get(family, ["tab:green"])
                style = {"color": palette[min(seen.get(family, 0), len(palette) - 1)], "lw": 1.3}
                seen[family] = seen.get(family, 0) + 1
            steps = len(curve["loss"])
            row_axes[0].plot(np.arange(1, steps + 1), curve["loss"], label=name, **style)
            row_axes[1].plot(np.arange(0, steps + 1), curve["accuracy"], label=name, **style)
        row_axes[0].set_yscale("log")
        row_axes[0].set_ylabel(f"{arch}\nsupport loss (mean over tasks)")
        row_axes[1].set_ylabel("query accuracy (mean over tasks)")
        for ax in row_axes:
            ax.set_xlabel("step (full-batch on the support set)")
            ax.grid(alpha=0.3)
            ax.axvline(trained_steps, color="gray", lw=0.8, ls=":")
        row_axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"Learned update rule (meta-learner LSTM, meta-trained for T={trained_steps} steps on the "
        f"conv-4 learner) vs SGD and Adam\n5-way {report['shots']}-shot Omniglot test characters, "
        f"{report['tasks']} tasks, same initial weights; dotted line: step T",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", help="a meta-learner LSTM checkpoint")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/optimizer_comparison.png"))
    parser.add_argument("--json", type=Path, help="also write the curves and the table here")
    parser.add_argument("--replot", type=Path, help="only redraw the figure from a --json file")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.out)
        return
    if not args.checkpoint:
        parser.error("--checkpoint is required (unless --replot)")
    torch.set_num_threads(1)

    meta_model, meta = load_method(args.checkpoint)
    cell = learned_update_rule(meta_model)  # MetaLSTM only: other methods have no update rule
    trained_steps = meta_model.settings.inner_steps
    print(f"meta-learner: {meta['path']} (trained T={trained_steps} steps)")
    optimizers: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "meta-learner": lambda p: MetaLSTMOptimizer(p, cell),
    }
    optimizers[f"meta-learner, state reset every {trained_steps}"] = lambda p: MetaLSTMOptimizer(
        p, cell, reset_interval=trained_steps
    )
    for lr in (0.01, 0.1, 1.0):
        optimizers[f"SGD lr={lr:g}"] = factory(torch.optim.SGD, lr)
    for lr in (1e-3, 1e-2):
        optimizers[f"Adam lr={lr:g}"] = factory(torch.optim.Adam, lr)

    task_list = tasks(args.tasks, args.shots, args.seed)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    table = []
    for arch, make_model in ARCHITECTURES.items():
        results[arch] = {}
        for name, make_optimizer in optimizers.items():
            start = time.perf_counter()
            runs = [
                run(make_model, make_optimizer, task, args.steps, args.seed + t)
                for t, task in enumerate(task_list)
            ]
            losses = np.stack([r[0] for r in runs])
            accuracies = np.stack([r[1] for r in runs])
            final = accuracies[:, -1]
            results[arch][name] = {
                "loss": np.nanmean(losses, 0).tolist(),
                "accuracy": accuracies.mean(0).tolist(),
            }
            at_t = min(trained_steps, args.steps)
            row: dict[str, Any] = {
                "architecture": arch,
                "optimizer": name,
                "query_accuracy_at_T": float(accuracies[:, at_t].mean()),
                "final_support_loss": float(np.nanmean(losses[:, -1])),
                "final_query_accuracy": float(final.mean()),
                "ci95": float(1.96 * final.std(ddof=1) / np.sqrt(len(final)))
                if len(final) > 1
                else float("nan"),
                "best_query_accuracy_over_steps": float(accuracies.mean(0).max()),
                "seconds": time.perf_counter() - start,
            }
            table.append(row)
            print(
                f"{arch:<22} {name:<36} acc at step {at_t} "
                f"{100 * row['query_accuracy_at_T']:.1f} %, at step {args.steps} "
                f"{100 * row['final_query_accuracy']:.1f} ± {100 * row['ci95']:.1f} % "
                f"(best {100 * row['best_query_accuracy_over_steps']:.1f} %), final loss "
                f"{row['final_support_loss']:.3f}, {row['seconds']:.1f} s",
                flush=True,
            )
    report = {
        "checkpoint": str(meta["path"]),
        "trained_steps": trained_steps,
        "tasks": args.tasks,
        "steps": args.steps,
        "shots": args.shots,
        "seed": args.seed,
        "table": table,
        "curves": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    plot(report, args.out)


if __name__ == "__main__":
    main()
