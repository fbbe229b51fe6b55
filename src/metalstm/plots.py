"""Figures: the learned gates across inner steps (the paper's Fig. 2) and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import FormatStrFormatter

from .data import EpisodeSampler
from .errors import ConfigError
from .files import write_file
from .methods.metalearner import MetaLSTM
from .runfolder import METRICS, metric_rows, read_config_values


def layer_name(parameter: str) -> str:
    """'blocks.2.conv.weight' → 'conv 3', 'blocks.2.norm.bias' → 'BN 3', 'head.*' → 'linear'."""
    parts = parameter.split(".")
    if parts[0] == "blocks":
        kind = "conv" if parts[2] == "conv" else "BN"
        return f"{kind} {int(parts[1]) + 1}"
    return "linear"


def collect_gates(model: MetaLSTM, sampler: EpisodeSampler, episodes: int) -> dict[str, np.ndarray]:
    """Mean σ(f) and σ(i) per learner layer, step and episode: {layer: [episodes, T, 2]}."""
    groups: dict[str, list[slice]] = {}
    for name, part in model.learner.parameter_groups():
        groups.setdefault(layer_name(name), []).append(part)
    per_layer: dict[str, list[np.ndarray]] = {layer: [] for layer in groups}
    model.eval()
    for i in range(episodes):
        episode = sampler.episode(step=i).to(model.device)
        with torch.no_grad():
            result = model.inner_loop(
                episode.support_x, episode.support_y, model.settings.eval_steps, record_gates=True
            )
        gates = torch.stack(result.infos)  # [T, 2, n]: σ(f), σ(i)
        for layer, parts in groups.items():
            values = torch.cat([gates[:, :, part] for part in parts], dim=2)  # [T, 2, n_layer]
            per_layer[layer].append(values.mean(dim=2).cpu().numpy())
    return {layer: np.stack(v) for layer, v in per_layer.items()}


def plot_gates(gates: dict[str, np.ndarray], out: Path, title: str = "") -> Path:
    """One column per learner layer; top row σ(i) (learning rate), bottom row σ(f) (shrinkage).

    Lines are the mean over episodes of the layer-mean gate; bands span the 10th-90th percentile.
    """
    layers = list(gates)
    fig, axes = plt.subplots(
        2, len(layers), figsize=(1.9 * len(layers) + 1, 4.6), sharex=True, squeeze=False
    )
    for col, layer in enumerate(layers):
        values = gates[layer]  # [episodes, T, 2]
        steps = np.arange(1, values.shape[1] + 1)
        for row, (index, label, color) in enumerate(
            [(1, "input gate σ(i)", "tab:blue"), (0, "forget gate σ(f)", "tab:orange")]
        ):
            ax = axes[row, col]
            series = values[:, :, index]
            ax.plot(steps, series.mean(0), color=color, lw=1.8)
            lo, hi = np.percentile(series, [10, 90], axis=0)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.25, lw=0)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            # plain tick labels: σ(f) sits just below 1, where an offset ("+9.999e-1") hides it
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.6g"))
            if row == 0:
                ax.set_title(layer, fontsize=9)
            else:
                ax.set_xlabel("inner step", fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(
        title or "Meta-learner gates across inner steps (mean, 10-90th percentile)", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, out)


@dataclass
class Curves:
    """A run's metrics as curves, with episodes (not updates) on the x axis."""

    name: str
    train_episodes: list[int]  # end of each log window
    train_loss: list[float]  # mean query loss of the window's training episodes
    train_accuracy: list[float]  # %
    val_episodes: list[int]
    val_accuracy: list[float]  # %


def read_curves(run_dir: Path) -> Curves:
    """The curves in ``run_dir/metrics.jsonl`` (written by ``metalstm train``)."""
    path = run_dir / METRICS
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no metrics.jsonl; give a run folder made by metalstm train"
        )
    rows = [row for _, row in metric_rows(path)]
    train = [r for r in rows if _is_number(r.get("loss")) and _is_number(r.get("accuracy"))]
    val = [r for r in rows if _is_number(r.get("val_accuracy"))]
    if not train and not val:
        raise ConfigError(f"{path} holds no metrics yet; train longer before plotting")
    meta_batch = 1
    with suppress(ConfigError):  # no or an unreadable config.yaml: one episode per update
        value = read_config_values(run_dir).get("meta_batch")
        meta_batch = value if type(value) is int and value >= 1 else 1
    return Curves(
        name=run_dir.resolve().name,
        train_episodes=[r["step"] * meta_batch for r in train],
        train_loss=[r["loss"] for r in train],
        train_accuracy=[100 * r["accuracy"] for r in train],
        val_episodes=[r["step"] * meta_batch for r in val],
        val_accuracy=[100 * r["val_accuracy"] for r in val],
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def curves_figure(runs: Sequence[Curves]) -> plt.Figure:
    """Training loss (left), training and validation accuracy (right) of one or more runs; with
    several, each run has its colour and its name in the legend."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    several = len(runs) > 1
    for index, curves in enumerate(runs):
        prefix = f"{curves.name}: " if several else ""
        # one run: training and validation in two colours; several: one colour per run
        train_colour, val_colour = (f"C{index}", f"C{index}") if several else ("C0", "C1")
        ax_loss.plot(curves.train_episodes, curves.train_loss, lw=1.2, color=train_colour)
        ax_acc.plot(
            curves.train_episodes,
            curves.train_accuracy,
            lw=1.0,
            alpha=0.4 if several else 0.7,
            color=train_colour,
            label=f"{prefix}training episodes",
        )
        ax_acc.plot(
            curves.val_episodes,
            curves.val_accuracy,
            marker="o",
            ms=3,
            lw=1.6,
            color=val_colour,
            label=f"{prefix}validation episodes",
        )
    ax_loss.set_xlabel("episodes")
    ax_loss.set_ylabel("query loss (training)")
    ax_loss.grid(alpha=0.3)
    ax_acc.set_xlabel("episodes")
    ax_acc.set_ylabel("query accuracy (%)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8 if len(runs) < 3 else 6)
    names = ", ".join(curves.name for curves in runs)
    fig.suptitle(f"Meta-training curves: {names}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write the curves of ``run_dirs`` (one run, or several to compare) to the PNG ``out``."""
    return _save(curves_figure([read_curves(run_dir) for run_dir in run_dirs]), out)


def _save(fig: plt.Figure, out: Path) -> Path:
    """Write the PNG through :func:`metalstm.files.write_file` (atomic, never half a PNG)."""
    try:
        return write_file(out, lambda handle: fig.savefig(handle, dpi=150, format="png"))
    finally:
        plt.close(fig)
