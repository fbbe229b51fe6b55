"""One entry point for every image source: :func:`load_split`."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, DataError
from .images import ClassImages, check_image_format, load_image_folder
from .miniimagenet import load_miniimagenet
from .omniglot import load_omniglot
from .storage import resolve_data_root

#: dataset -> (image_size, channels) used when the caller gives none.
DEFAULT_FORMAT = {"omniglot": (28, 1), "miniimagenet": (84, 3), "folder": (84, 3)}
FOLDER_PARTS = ("train", "val", "test")


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
    if dataset not in DEFAULT_FORMAT:
        raise ConfigError(f"unknown dataset {dataset!r}; use one of {', '.join(DEFAULT_FORMAT)}")
    default_size, default_channels = DEFAULT_FORMAT[dataset]
    size = default_size if image_size is None else image_size
    chans = default_channels if channels is None else channels
    check_image_format(size, chans)
    if dataset == "omniglot":
        return load_omniglot(split, part, data_root=data_root, image_size=size, channels=chans)
    if dataset == "miniimagenet":
        return load_miniimagenet(split, part, data_root=data_root, image_size=size, channels=chans)
    return load_folder_split(part, data_root=data_root, image_size=size, channels=chans)


def load_folder_split(
    part: str, *, data_root: str | Path | None, image_size: int, channels: int
) -> ClassImages:
    """An ImageFolder, or its ``part`` sub-folder when it has train/val/test sub-folders."""
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
