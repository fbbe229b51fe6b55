"""miniImageNet in the Ravi & Larochelle layout.

A folder holding ``images/`` (every JPEG named in the CSVs) and ``train.csv``, ``val.csv``,
``test.csv`` (``filename,label`` rows, 64 / 16 / 20 classes of 600 images): either the data root
itself or ``<data root>/miniimagenet``. Classes are sorted by label; images keep their CSV order.
Decoded images are cached (one ``.npz`` per part, keyed by the CSV's content, the size and the
channels; delete the cache after changing the images themselves).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .images import ClassImages, load_images
from .storage import cache_dirs, load_or_build_arrays, resolve_data_root

SPLITS = ("ravi",)
PARTS = ("train", "val", "test", "trainval")
CACHE_VERSION = 1
_HEADER = ["filename", "label"]


def miniimagenet_dir(data_root: str | Path | None = None) -> Path:
    """The folder holding ``images/`` and the split CSVs (the data root or its ``miniimagenet``)."""
    root = resolve_data_root(data_root)
    for folder in (root, root / "miniimagenet"):
        if (folder / "images").is_dir():
            return folder
    raise DataError(
        f"miniImageNet not found: no {root / 'miniimagenet' / 'images'} folder; put the images "
        "there with train.csv, val.csv and test.csv next to it (Ravi layout) or pass --data-root"
    )


def read_ravi_csv(path: Path) -> dict[str, list[str]]:
    """``{label: [filename, ...]}`` from a Ravi split CSV, labels sorted, files in CSV order."""
    if not path.is_file():
        raise DataError(
            f"miniImageNet split file {path} is missing; copy {path.name} of the Ravi split "
            "(filename,label rows) there"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or [cell.strip() for cell in rows[0]] != _HEADER:
        raise DataError(f"{path}: first line must be 'filename,label'; restore the Ravi CSV")
    classes: dict[str, list[str]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not all(cell.strip() for cell in row):
            raise DataError(
                f"{path}:{lineno}: expected 'filename,label', got {row!r}; fix the line"
            )
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    if not classes:
        raise DataError(f"{path} lists no images; restore the Ravi CSV")
    return {label: classes[label] for label in sorted(classes)}


def load_miniimagenet(
    split: str, part: str, *, data_root: str | Path | None, image_size: int, channels: int
) -> ClassImages:
    """The classes of ``part`` (``train``, ``val``, ``test`` or ``trainval``) of the Ravi split."""
    if split not in SPLITS:
        raise ConfigError(f"unknown miniImageNet split {split!r}; use ravi")
    if part not in PARTS:
        raise ConfigError(f"unknown split part {part!r}; use one of {', '.join(PARTS)}")
    folder = miniimagenet_dir(data_root)
    parts = ("train", "val") if part == "trainval" else (part,)
    return ClassImages.concat(
        [_load_part(folder, p, image_size=image_size, channels=channels) for p in parts]
    )


def _load_part(folder: Path, part: str, *, image_size: int, channels: int) -> ClassImages:
    csv_path = folder / f"{part}.csv"
    classes = read_ravi_csv(csv_path)
    paths = [folder / "images" / name for names in classes.values() for name in names]
    counts = np.array([len(names) for names in classes.values()], dtype=np.int64)
    shape = (len(paths), channels, image_size, image_size)

    def build() -> Mapping[str, np.ndarray]:
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise DataError(
                f"{missing} (listed in {csv_path}) is missing; put every image of the CSV there"
            )
        images = load_images(paths, image_size=image_size, channels=channels)
        return {"images": images.numpy(), "counts": counts}

    def is_valid(arrays: Mapping[str, np.ndarray]) -> bool:
        return (
            set(arrays) == {"images", "counts"}
            and arrays["images"].dtype == np.uint8
            and arrays["images"].shape == shape
            and np.array_equal(arrays["counts"], counts)
        )

    key = hashlib.sha256(csv_path.read_bytes()).hexdigest()[:16]
    arrays = load_or_build_arrays(
        f"miniimagenet-{part}-{image_size}px-{channels}c-{key}-v{CACHE_VERSION}.npz",
        cache_dirs(folder, "miniimagenet"),
        build,
        is_valid,
    )
    return ClassImages.from_counts(
        torch.from_numpy(arrays["images"]), counts.tolist(), list(classes)
    )
