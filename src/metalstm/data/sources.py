"""The registered image sources (:data:`DATASETS`) and one entry point for all: :func:`load_split`.

A new source is a loader plus :func:`register_dataset`; nothing else names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError, DataError
from .images import ClassImages, check_image_format, load_image_folder
from .miniimagenet import load_miniimagenet
from .omniglot import load_omniglot
from .storage import resolve_data_root

FOLDER_PARTS = ("train", "val", "test")


class SplitLoader(Protocol):
    def __call__(
        self, split: str, part: str, *, data_root: str | Path | None, image_size: int, channels: int
    ) -> ClassImages: ...


@dataclass(frozen=True)
class Dataset:
    """A registered image source: its loader and its image conventions."""

    name: str
    load: SplitLoader  # (split, part, data_root=, image_size=, channels=) -> ClassImages
    image_size: int  # default side when the config gives none
    channels: int
    inverted: bool  # stored inverted (strokes 1 on 0): predict inverts dark-on-light drawings


DATASETS: dict[str, Dataset] = {}


def register_dataset(dataset: Dataset) -> Dataset:
    """Add an image source; ``Config.dataset`` and ``load_split`` then accept its name."""
    DATASETS[dataset.name] = dataset
    return dataset


def dataset_entry(name: str) -> Dataset:
    """The registered dataset ``name``; a clear :class:`ConfigError` for an unknown one."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}") from None


def load_split(
    dataset: str,
    split: str,
    part: str,
    *,
    data_root: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> ClassImages:
    """The classes of one part of a dataset split, decoded and resized, ready for sampling.

    * ``omniglot``: ``split`` is ``vinyals`` or ``lake``; 28 x 28 grayscale by default.
    * ``miniimagenet``: ``split`` is ``ravi``; 84 x 84 RGB by default.
    * ``folder``: ``data_root`` is an ImageFolder (one sub-folder per class); when it has
      ``train/``, ``val/`` or ``test/`` sub-folders, ``part`` picks one (``trainval``: train then
      val), else the folder itself is the class set. ``split`` is not used. 84 x 84 RGB by default.

    ``part`` is ``train``, ``val``, ``test`` or ``trainval``.
    """
    entry = dataset_entry(dataset)
    size = entry.image_size if image_size is None else image_size
    chans = entry.channels if channels is None else channels
    check_image_format(size, chans)
    return entry.load(split, part, data_root=data_root, image_size=size, channels=chans)


def load_folder_split(
    split: str, part: str, *, data_root: str | Path | None, image_size: int, channels: int
) -> ClassImages:
    """An ImageFolder, or its ``part`` sub-folder when it has train/val/test sub-folders
    (``split`` is not used)."""
    if part not in (*FOLDER_PARTS, "trainval"):
        raise ConfigError(f"unknown split part {part!r}; use train, val, test or trainval")
    root = resolve_data_root(data_root)
    present = [p for p in FOLDER_PARTS if (root / p).is_dir()]
    if not present:
        return load_image_folder(root, image_size=image_size, channels=channels)
    wanted = ("train", "val") if part == "trainval" else (part,)
    for name in wanted:
        if name not in present:
            raise DataError(
                f"{root} has {'/'.join(present)} sub-folders but no {name}/; "
                f"add {root / name} or choose another part"
            )
    return ClassImages.concat(
        [load_image_folder(root / p, image_size=image_size, channels=channels) for p in wanted]
    )


register_dataset(Dataset("omniglot", load_omniglot, 28, 1, inverted=True))
register_dataset(Dataset("miniimagenet", load_miniimagenet, 84, 3, inverted=False))
register_dataset(Dataset("folder", load_folder_split, 84, 3, inverted=False))
