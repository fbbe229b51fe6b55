"""How a :class:`~metalstm.predict.folders.PredictionResult` is shown: the CSV or JSON table
(:func:`render_table`), the terminal summary (:func:`summary`) and the PNG grid of support and
labelled query images (:func:`grid_figure`, :func:`render_grid`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .folders import PredictionResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_SHOWN_SUPPORT = 10  # per class, in --visualize
MAX_SHOWN_QUERY = 100


def render_table(result: PredictionResult, suffix: str) -> str:
    """The rows as CSV (``file,label,p_<class>...``) or JSON (a list of row objects)."""
    rows = result.rows()
    if suffix == ".json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    truth = ["truth"] if result.truth_known else []
    writer.writerow(["file", "label", *truth, *(f"p_{name}" for name in result.class_names)])
    for row in rows:
        known = [row["truth"] or ""] if result.truth_known else []
        writer.writerow([row["file"], row["label"], *known, *row["probabilities"].values()])
    return buffer.getvalue()


def render_grid(result: PredictionResult) -> bytes:
    """PNG bytes of :func:`grid_figure`."""
    import matplotlib.pyplot as plt

    fig = grid_figure(result)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def grid_figure(result: PredictionResult) -> Figure:
    """A matplotlib figure: the support images (one column per class), then the labelled query
    images. Query titles are green when right, red with the true label beside the prediction
    when wrong, black when the truth is unknown; the title explains the colours only when some
    truth is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result.class_names
    per_class = [
        torch.nonzero(result.support_labels == c).flatten()[:MAX_SHOWN_SUPPORT].tolist()
        for c in range(len(names))
    ]
    shown_q = min(len(result.files), MAX_SHOWN_QUERY)
    cols = max(8, len(names))
    s_rows = max(len(p) for p in per_class)
    q_rows = math.ceil(shown_q / cols)
    fig, axes = plt.subplots(
        s_rows + q_rows,
        cols,
        figsize=(1.5 * cols, 1.6 * (s_rows + q_rows) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.set_axis_off()

    def show(ax: Any, image: Tensor, title: str, color: str, frame: float) -> None:
        pixels = image.permute(1, 2, 0).numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(pixels)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=6.5, color=color)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(frame)

    for c, indices in enumerate(per_class):
        for row, index in enumerate(indices):
            title = f"support\n{_short(names[c])}" if row == 0 else ""
            show(axes[row, c], result.support_images[index], title, "navy", 1.5)
    for q in range(shown_q):
        label, truth = result.labels[q], result.truth[q]
        p = float(result.probabilities[q].max())
        if truth is None:
            color, title, frame = "black", f"{_short(label)}\np={p:.2f}", 0.5
        elif truth == label:
            color, title, frame = "green", f"{_short(label)}\np={p:.2f} ✓", 2.0
        else:
            color, title, frame = "red", f"{_short(label)} p={p:.2f}\ntrue {_short(truth)}", 2.0
        show(axes[s_rows + q // cols, q % cols], result.query_images[q], title, color, frame)
    fig.suptitle(grid_title(result, shown_q), fontsize=9)
    return fig


def grid_title(result: PredictionResult, shown: int) -> str:
    """What the grid shows, and what its colours mean when some truth is known."""
    more = f" (first {shown} of {len(result.files)})" if shown < len(result.files) else ""
    title = (
        f"top: support images, one column per class; below: query images{more} with the "
        "predicted label and its probability"
    )
    accuracy = result.accuracy
    if accuracy is None:
        return title
    known = sum(t is not None for t in result.truth)
    return (
        f"{title}\ngreen: right, red: wrong (with the true label); accuracy "
        f"{100 * accuracy:.1f} % on the {known} query images whose folder names their class"
    )


def _short(text: str, width: int = 16) -> str:
    """``text`` cut in the middle to ``width`` characters (ends tell classes apart best)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[-(width - 1 - head) :]


def summary(result: PredictionResult, max_rows: int = 30) -> str:
    """The terminal table: per-image rows (up to ``max_rows``), then counts per label."""
    lines = []
    width = min(60, max(len(f) for f in result.files))
    lw = min(40, max(5, *(len(name) for name in result.class_names)))
    truth_header = f" {'truth':<{lw}}" if result.truth_known else ""
    lines.append(f"{'file':<{width}}  {'label':<{lw}}{truth_header} {'p':>6}")
    shown = result.files if len(result.files) <= max_rows else result.files[: max_rows - 10]
    for q, file in enumerate(shown):
        name = file if len(file) <= width else "…" + file[-(width - 1) :]
        label, truth = result.labels[q], result.truth[q]
        truth_cell = f" {_short(truth or '-', lw):<{lw}}" if result.truth_known else ""
        mark = "  ✗" if truth is not None and truth != label else ""
        p = float(result.probabilities[q].max())
        lines.append(f"{name:<{width}}  {_short(label, lw):<{lw}}{truth_cell} {p:>6.3f}{mark}")
    if len(shown) < len(result.files):
        lines.append(f"... {len(result.files) - len(shown)} more rows (write them all with --out)")
    lines.append("")
    lines.append(f"{'label':<{lw}} {'images':>7} {'mean p':>7}")
    for c, name in enumerate(result.class_names):
        picked = [q for q, label in enumerate(result.labels) if label == name]
        mean_p = float(result.probabilities[picked, c].mean()) if picked else float("nan")
        lines.append(f"{_short(name, lw):<{lw}} {len(picked):>7} {mean_p:>7.3f}")
    accuracy = result.accuracy
    if accuracy is not None:
        known = sum(t is not None for t in result.truth)
        lines.append(
            f"accuracy: {100 * accuracy:.1f} % on the {known} query images whose folder names "
            "their class"
        )
    return "\n".join(lines)
