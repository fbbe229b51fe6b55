"""Prediction on the user's image folders: :func:`predict_folders` reads a support folder (one
sub-folder per class) and query folders or files, checks them, decides whether to invert the
images, adapts through :mod:`.tensors` and returns a :class:`PredictionResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.images import IMAGE_SUFFIXES, load_image_folder, load_images
from ..data.sources import dataset_entry
from ..errors import ConfigError, DataError
from .tensors import adapt, check_n_way, load_model, max_ways


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
    ``invert`` is ``auto``, ``yes`` or ``no`` (see :mod:`metalstm.predict`). Every bad input
    raises a :class:`~metalstm.errors.MetaLSTMError` before anything is computed.
    """
    if invert not in ("auto", "yes", "no"):
        raise ConfigError(f"invert={invert!r} is invalid; use auto, yes or no")
    model, meta = load_model(checkpoint, steps=steps, device=device)
    config = model.config
    size, channels = config.image_size, config.channels
    support_dir = Path(support).expanduser()
    _check_support_root(support_dir)
    classes = load_image_folder(support_dir, image_size=size, channels=channels, invert=False)
    check_n_way(classes.n_classes, max_ways(model), f"the class folders of {support_dir}")
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
