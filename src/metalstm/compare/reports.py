"""The comparison's reports: results.md, results.csv, results.json and results.png."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..evaluation import EvalResult
from ..files import write_file
from ..progress import format_seconds
from .evaluation import MethodResult
from .request import Request
from .training import Trained


def protocol_line(base: Config, fingerprint: str) -> str:
    mode = "transductive" if base.transductive else "non-transductive (support statistics)"
    return (
        f"{base.dataset}/{base.split} test classes, {base.n_way}-way {base.k_shot}-shot, "
        f"{base.eval_queries} queries per class, {base.test_episodes} fixed episodes "
        f"(seed {base.test_seed}, fingerprint {fingerprint[:16]}), identical for every method; "
        f"BN at test: {mode}; accuracy = mean ± 1.96·std/√E"
    )


def _seconds(value: float | None) -> str:
    return "—" if value is None else format_seconds(value)


def _cost(trained: Trained) -> str:
    """A method's training cost in the table: wall time / CPU time."""
    return f"{_seconds(trained.cost.seconds)} / {_seconds(trained.cost.cpu_seconds)}"


def machines_line(results: Sequence[MethodResult], here: str) -> str:
    """Where the comparison ran, and where each method trained where that was elsewhere (or is
    not recorded)."""
    line = f"Machine: {here} (evaluation"
    elsewhere = []
    for r in results:
        if r.trained.origin == "untrained":
            continue
        where = " then ".join(r.trained.cost.machines) or "a machine not recorded"
        if where != here:
            elsewhere.append(f"`{r.method}` trained on {where}")
    return line + (f"; {'; '.join(elsewhere)})." if elsewhere else " and training).")


def _accuracy(result: EvalResult | None) -> str:
    return "—" if result is None else f"{100 * result.mean:.2f} ± {100 * result.ci95:.2f}"


def markdown(
    results: Sequence[MethodResult], request: Request, base: Config, fp: str, here: str
) -> str:
    beside = not base.transductive  # a transductive column beside the protocol's
    lines = [
        f"# Few-shot comparison: {request.preset}",
        "",
        f"Protocol: {protocol_line(base, fp)}.",
        "",
        "| Method | Accuracy (%) | "
        + ("Transductive (%) | " if beside else "")
        + "Episodes | Training: wall / CPU time | Published (%) | Notes |",
        "|---|---|" + ("---|" if beside else "") + "---|---|---|---|",
    ]
    for r in results:
        published = "—" if r.published is None else f"{r.published:.2f}"
        lines.append(
            f"| {r.title} (`{r.method}`) | {_accuracy(r.result)} | "
            + (f"{_accuracy(r.transductive)} | " if beside else "")
            + f"{len(r.result.accuracies)} | {_cost(r.trained)} | {published} "
            f"| {r.notes} |"
        )
    lines += [
        "",
        f"Command: `{request.command()}`",
        "",
        machines_line(results, here),
        "",
        "Training: wall time of each method's training run, and CPU time (every thread of the "
        "process: one core's minutes when it ran on one thread), validation included; `—` when "
        "the checkpoint does not record it. Published: the figure quoted in the project's SPEC "
        "for this dataset and N-way K-shot setting, for reference only (other budgets and "
        "protocols).",
    ]
    if beside:
        lines.append(
            "Transductive: the same checkpoint on the same episodes with each query batch "
            "normalised by its own statistics (the protocol several published figures use); "
            "`—` where a method's test statistics do not come from the episode."
        )
    lines.append("")
    return "\n".join(lines)


CSV_FIELDS = (
    "method",
    "title",
    "accuracy",
    "ci95",
    "transductive_accuracy",
    "transductive_ci95",
    "episodes",
    "train_seconds",
    "train_cpu_seconds",
    "eval_seconds",
    "eval_cpu_seconds",
    "published",
    "notes",
    "checkpoint",
    "fingerprint",
)


def csv_text(results: Sequence[MethodResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = r.to_json()
        writer.writerow({k: row[k] for k in CSV_FIELDS})
    return buffer.getvalue()


def results_json(
    results: Sequence[MethodResult],
    request: Request,
    base: Config,
    fingerprint: str,
    data: str,
    here: str,
) -> dict[str, Any]:
    return {
        "preset": request.preset,
        "command": request.command(),
        "machine": here,  # where the methods were evaluated; each one's training: train_machines
        "protocol": protocol_line(base, fingerprint),
        "dataset": base.dataset,
        "split": base.split,
        "n_way": base.n_way,
        "k_shot": base.k_shot,
        "q_query": base.eval_queries,
        "episodes": base.test_episodes,
        "seed": base.test_seed,
        "transductive": base.transductive,
        "fingerprint": fingerprint,
        "test_images_sha256": data,
        "methods": [r.to_json() for r in results],
    }


def plot(results: Sequence[MethodResult], out: Path, title: str, n_way: int) -> Path:
    """Bar chart of the accuracies with 95% CI error bars (published figures as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(results) + 4.0, 4.2))
    x = list(range(len(results)))
    means = [100 * r.result.mean for r in results]
    errors = [100 * r.result.ci95 if r.result.ci95 == r.result.ci95 else 0.0 for r in results]
    ax.bar(x, means, yerr=errors, capsize=4, color="#4c72b0", label="this run (95% CI)")
    marked = [(i, r.published) for i, r in enumerate(results) if r.published is not None]
    if marked:
        ax.scatter(
            [i for i, _ in marked],
            [p for _, p in marked],
            marker="_",
            s=600,
            color="#c44e52",
            zorder=3,
            label="published",
        )
    ax.axhline(100 / n_way, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(x, [r.method for r in results], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        write_file(out, lambda handle: fig.savefig(handle, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return out
