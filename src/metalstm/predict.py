"""Few-shot classification of your own images with a trained meta-learner.

A practitioner has N kinds of things and K labelled photos of each, and wants labels for many
more. :func:`predict_folders` (the ``metalstm predict`` command) reads a *support* folder with one
sub-folder per class (the folder name is the label), brings every image to the checkpoint's input
format, lets the meta-learner train the learner on the support set (its T inner steps, exactly as
at meta-test time) and labels each query image with class probabilities.

Python API, on tensors::

    from metalstm.predict import adapt, load_model, predict

    model, _ = load_model("runs/omniglot/best")          # path, run folder or shipped name
    # support_x: float [N*K, C, H, W] in [0, 1] (or uint8); support_y: int [N*K] in 0..N-1
    labels, probabilities = predict(model, support_x, support_y, query_x)
    classifier = adapt(model, support_x, support_y)      # adapt once, label many batches
    labels, probabilities = classifier.predict(more_query_x)

Decisions (and why)
-------------------
* **Fewer classes than trained (N < N_train) are accepted; more are refused.** The learner's last
  layer has N_train outputs. The support labels 0..N-1 use its first N outputs; adaptation is the
  unchanged meta-learned procedure (the meta-learner only ever sees a support set whose labels
  happen to leave N_train - N outputs unused, and it pushes those down), and the probabilities
  are the softmax over the first N logits only, i.e. the learner's class probabilities given that
  the image belongs to one of the N support classes. With N > N_train there is no output for the
  extra classes; the message names the N the checkpoint supports. N = 1 is refused (nothing to
  tell apart).
* **Any K, and unequal K per class, are accepted.** The meta-learner is coordinate-wise: the
  support set only changes the learner's loss and gradient (the mean over all support images, one
  batch, as in meta-training), never a shape. With unequal K that mean weighs each class by its
  number of images, like any class-imbalanced training set; the command says so on stderr.
* **Inversion.** Omniglot checkpoints were meta-trained on inverted drawings (strokes 1 on a
  black background). ``--invert auto`` (the default) inverts when the checkpoint was trained on
  inverted images (``dataset: omniglot``) *and* the support images are light on average (mean
  intensity > 0.5, i.e. dark-on-light drawings); checkpoints trained on photos are never inverted
  automatically. ``yes`` / ``no`` force it. The decision and its reason go to stderr and apply to
  the support and query images alike.
* **Each query image is labelled on its own.** Batch norm uses the statistics of the support
  passes (the authors' non-transductive protocol), whatever the checkpoint's ``transductive``
  setting, so a label never depends on which other images are in the query.
* **True labels** of query images are known when the folder that directly holds an image is named
  like a support class (``query/CLASS/img.png``). They add a ``truth`` column to the table, the
  CSV and the JSON rows (empty / null for images whose folder names no class), an accuracy line,
  and, in ``--visualize``, green and red marks; with a flat query folder none of these appear.
* Images of any size and mode are converted by the project's one decoder
  (:func:`metalstm.data.images.decode_image`): grayscale or RGB as the checkpoint was trained,
  resized to its image size.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .data.images import IMAGE_SUFFIXES, load_image_folder, load_images
from .data.sources import dataset_entry
from .errors import ConfigError, DataError
from .methods.base import Classifier, Method

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FewShotClassifier",
    "PredictionResult",
    "adapt",
    "load_model",
    "predict",
    "predict_folders",
]

BATCH_SIZE = 256  # query images per forward pass (each is labelled independently)
MAX_SHOWN_SUPPORT = 10  # per class, in --visualize
MAX_SHOWN_QUERY = 100


# ------------------------------------------------------------------------------------ tensors


@dataclass
class FewShotClassifier:
    """A learner adapted to a support set of ``n_way`` classes.

    Calling it on images ``[B, C, H, W]`` returns logits ``[B, n_way]``; :meth:`probabilities`
    and :meth:`predict` give the softmax over those ``n_way`` classes and the arg-max labels.
    """

    classifier: Classifier
    n_way: int
    image_shape: tuple[int, int, int]
    device: torch.device
    batch_size: int | None = BATCH_SIZE

    def __call__(self, images: Tensor) -> Tensor:
        x = _as_images(images, self.image_shape, self.device, "query images")
        size = self.batch_size or len(x)
        with torch.no_grad():
            parts = [self.classifier(x[i : i + size]) for i in range(0, len(x), max(size, 1))]
        logits = torch.cat(parts) if parts else x.new_zeros(0, self.n_way)
        return logits[:, : self.n_way]  # N < N_train: only the outputs of the support labels

    def probabilities(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, n_way]`` (rows sum to 1)."""
        return torch.softmax(self(images).float(), dim=-1)

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels [B], probabilities [B, n_way])``."""
        probabilities = self.probabilities(images)
        return probabilities.argmax(-1), probabilities


def load_model(
    checkpoint: str | Path, *, steps: int | None = None, device: str | torch.device = "cpu"
) -> tuple[Method, dict[str, Any]]:
    """A trained model ready to adapt, and its checkpoint metadata.

    ``checkpoint`` is a ``.safetensors`` file, a run folder or a shipped name; ``steps`` overrides
    the number of inner steps at adaptation (default: as trained). Batch norm is set to the
    non-transductive protocol so that query images are labelled independently.
    """
    from .serialization import load_method

    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps={steps!r} is invalid; give at least 1 inner step")
    # Evaluation-time settings only (read at adaptation time; the learner's shape is untouched).
    changes: dict[str, Any] = {"transductive": False}
    if steps is not None:
        changes["eval_inner_steps"] = steps
    return load_method(checkpoint, device=device, **changes)


def adapt(model: Method, support_x: Tensor, support_y: Tensor) -> FewShotClassifier:
    """Adapt the model's learner to a support set; return a :class:`FewShotClassifier`.

    ``support_x``: images ``[M, C, H, W]`` in the model's input format, float in [0, 1] or uint8
    (divided by 255); ``support_y``: integer labels ``[M]`` using every class 0..N-1 at least once,
    with 2 <= N <= the model's ``n_way``. Any number of images per class works.

    Example::

        model, _ = load_model("runs/omniglot/best")
        classifier = adapt(model, support_x, support_y)
        labels, probabilities = classifier.predict(query_x)
    """
    config = model.config
    shape = (config.channels, config.image_size, config.image_size)
    device = model.device
    x = _as_images(support_x, shape, device, "support images")
    y = _check_labels(support_y, len(x), config.n_way).to(device)
    n_way = int(y.max()) + 1
    # A transductive model normalises with the query batch's statistics: never split the batch.
    batch_size = None if config.transductive else BATCH_SIZE
    return FewShotClassifier(model.adapt(x, y), n_way, shape, device, batch_size)


def predict(
    model: Method, support_x: Tensor, support_y: Tensor, query_x: Tensor
) -> tuple[Tensor, Tensor]:
    """Labels ``[Q]`` and class probabilities ``[Q, N]`` of ``query_x`` after adapting.

    See :func:`adapt` for the formats. Example::

        model, _ = load_model("runs/omniglot/best")
        labels, probabilities = predict(model, support_x, support_y, query_x)
    """
    return adapt(model, support_x, support_y).predict(query_x)


def _as_images(
    images: Tensor, shape: tuple[int, int, int], device: torch.device, what: str
) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"{what} must be a tensor [B, C, H, W], got {got}")
    if tuple(images.shape[1:]) != shape:
        raise DataError(
            f"{what} are {'x'.join(map(str, images.shape[1:]))} (CxHxW) but the model takes "
            f"{'x'.join(map(str, shape))}; convert them (the predict command does it for you)"
        )
    if images.dtype == torch.uint8:
        return images.to(device).float() / 255
    if not images.is_floating_point():
        raise DataError(f"{what} must be float in [0, 1] or uint8, got {images.dtype}")
    return images.to(device, torch.float32)


def _check_labels(labels: Tensor, count: int, max_way: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise DataError("support labels must be a 1-D integer tensor")
    if len(labels) != count:
        raise DataError(f"{count} support images but {len(labels)} labels; give one label each")
    if count == 0:
        raise DataError("the support set is empty; give at least one image per class")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise DataError("support labels must be 0..N-1; found a negative label")
    n_way = int(labels.max()) + 1
    missing = sorted(set(range(n_way)) - set(labels.tolist()))
    if missing:
        raise DataError(
            f"support labels must use every class 0..{n_way - 1}; class {missing[0]} has no image"
        )
    _check_n_way(n_way, max_way, "the support labels")
    return labels


def _check_n_way(n_way: int, max_way: int, source: str) -> None:
    if n_way < 2:
        raise DataError(f"{source} have only {n_way} class; give at least 2 classes to tell apart")
    if n_way > max_way:
        raise DataError(
            f"{source} have {n_way} classes but the checkpoint supports at most {max_way} "
            f"(it was meta-trained {max_way}-way); use at most {max_way} classes or a checkpoint "
            f"trained with --set n_way={n_way}"
        )


# ------------------------------------------------------------------------------------ folders


@dataclass
class PredictionResult:
    """What :func:`predict_folders` found: one row per query image, and the images it used."""

    class_names: tuple[str, ...]
    files: list[str]  # query files, in output order
    labels: list[str]  # predicted label per query file
    probabilities: Tensor  # [Q, N]
    truth: list[str | None]  # true label when the query file's folder names a class
    support_images: Tensor  # uint8 [M, C, H, W] as the model saw them
    support_labels: Tensor  # [M]
    query_images: Tensor  # uint8 [Q, C, H, W] as the model saw them
    inverted: bool
    inversion_reason: str
    checkpoint: str
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """``{"file", "label", "probabilities": {label: p}}`` per query image, with ``"truth"``
        (the true label, or None) after ``"label"`` when any query image's truth is known."""
        rows = []
        for file, label, truth, probs in zip(
            self.files, self.labels, self.truth, self.probabilities, strict=True
        ):
            row: dict[str, Any] = {"file": file, "label": label}
            if self.truth_known:
                row["truth"] = truth
            row["probabilities"] = {
                name: round(float(p), 6)
                for name, p in zip(self.class_names, probs.tolist(), strict=True)
            }
            rows.append(row)
        return rows

    @property
    def truth_known(self) -> bool:
        """Whether any query image's true label is known (its folder names a class)."""
        return any(t is not None for t in self.truth)

    @property
    def accuracy(self) -> float | None:
        """Fraction of query images with a known true label that got it (None when none known)."""
        known = [(p, t) for p, t in zip(self.labels, self.truth, strict=True) if t is not None]
        return sum(p == t for p, t in known) / len(known) if known else None


def predict_folders(
    checkpoint: str | Path,
    support: str | Path,
    query: Sequence[str | Path],
    *,
    invert: str = "auto",
    steps: int | None = None,
    device: str | torch.device = "cpu",
) -> PredictionResult:
    """Adapt to a support folder (one sub-folder per class) and label the query images.

    ``query`` holds folders (their images, and the images of their sub-folders) and image files.
    ``invert`` is ``auto``, ``yes`` or ``no`` (see the module docstring). Every bad input raises a
    :class:`~metalstm.errors.MetaLSTMError` before anything is computed.
    """
    if invert not in ("auto", "yes", "no"):
        raise ConfigError(f"invert={invert!r} is invalid; use auto, yes or no")
    model, meta = load_model(checkpoint, steps=steps, device=device)
    config = model.config
    size, channels = config.image_size, config.channels
    support_dir = Path(support).expanduser()
    _check_support_root(support_dir)
    classes = load_image_folder(support_dir, image_size=size, channels=channels, invert=False)
    _check_n_way(classes.n_classes, config.n_way, f"the class folders of {support_dir}")
    notes = []
    counts = classes.class_count.tolist()
    if min(counts) != max(counts):
        notes.append(
            f"classes have unequal numbers of support images ({min(counts)} to {max(counts)}); "
            "accepted: the adaptation loss weighs each class by its number of images"
        )
    query_files, truth = _query_files(query, classes.class_names)
    query_images = load_images(query_files, image_size=size, channels=channels, invert=False)

    inverted, reason = _decide_inversion(
        invert, classes.images, dataset_entry(config.dataset).inverted
    )
    support_images = 255 - classes.images if inverted else classes.images
    if inverted:
        query_images = 255 - query_images
    support_labels = torch.repeat_interleave(torch.arange(classes.n_classes), classes.class_count)

    classifier = adapt(model, support_images, support_labels)
    labels, probabilities = classifier.predict(query_images)
    return PredictionResult(
        class_names=classes.class_names,
        files=[str(f) for f in query_files],
        labels=[classes.class_names[i] for i in labels.tolist()],
        probabilities=probabilities.cpu(),
        truth=truth,
        support_images=support_images,
        support_labels=support_labels,
        query_images=query_images,
        inverted=inverted,
        inversion_reason=reason,
        checkpoint=str(meta["path"]),
        notes=notes,
    )


def _check_support_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"support folder {root} does not exist; pass a folder of class sub-folders")
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith(".") and not entry.is_dir():
            raise DataError(
                f"support folder {root} holds a file {entry.name} at its top level; put every "
                "image in the sub-folder of its class (the folder name is the label)"
            )


def _check_image_file(path: Path, where: str) -> None:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(
            f"{path} is not an image (expected {', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"remove it or move it out of {where}"
        )


def _query_files(
    items: Sequence[str | Path], class_names: Sequence[str]
) -> tuple[list[Path], list[str | None]]:
    """Query image files in order (folders sorted, duplicates dropped) and their true labels."""
    if not items:
        raise DataError("no query images given; pass a folder of images or image files")
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = []
            for entry in sorted(path.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    for inner in sorted(entry.iterdir()):
                        if inner.name.startswith("."):
                            continue
                        if inner.is_dir():
                            raise DataError(
                                f"query folder {path} nests folder {inner}; use "
                                "query/IMAGE or query/CLASS/IMAGE, one level deep"
                            )
                        _check_image_file(inner, f"query folder {path}")
                        found.append(inner)
                else:
                    _check_image_file(entry, f"query folder {path}")
                    found.append(entry)
            if not found:
                raise DataError(
                    f"query folder {path} holds no images; put the images to label in it"
                )
            files.extend(found)
        elif path.is_file():
            _check_image_file(path, "the query list")
            files.append(path)
        elif path.exists():
            raise DataError(
                f"query path {path} is not a file or folder; pass image files or folders"
            )
        else:
            raise DataError(f"query path {path} does not exist; pass image files or folders")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    names = set(class_names)
    truth = [f.parent.name if f.parent.name in names else None for f in unique]
    return unique, truth


def _decide_inversion(mode: str, support: Tensor, trained_inverted: bool) -> tuple[bool, str]:
    """Whether to invert (255 - x) the images, and why, in words."""
    if mode == "yes":
        return True, "yes (--invert yes)"
    if mode == "no":
        return False, "no (--invert no)"
    mean = float(support.float().mean()) / 255
    if not trained_inverted:
        return False, "no (auto: the checkpoint was trained on images that were not inverted)"
    if mean > 0.5:
        return True, (
            f"yes (auto: the support images are light on average, mean intensity {mean:.2f} > "
            "0.5, and the checkpoint was trained on inverted Omniglot drawings; "
            "override with --invert no)"
        )
    return False, (
        f"no (auto: the support images are dark on average, mean intensity {mean:.2f} <= 0.5, "
        "like the checkpoint's inverted training drawings; override with --invert yes)"
    )


# ------------------------------------------------------------------------------------ outputs


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
