"""Images in memory (:class:`ClassImages`) and the one image decoder every source uses.

The decoder (:func:`decode_image`) opens any Pillow-readable image, converts it to grayscale
(``channels=1``) or RGB (``channels=3``), resizes it to ``image_size x image_size`` with Lanczos
anti-aliasing (aspect ratio not kept) and optionally inverts it (``255 - x``; Omniglot's strokes
become 255). Many images are decoded by a small process pool on Linux.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_MODES = {1: "L", 3: "RGB"}
_MAX_WORKERS = 8
_MIN_PER_WORKER = 256

T = TypeVar("T")


@dataclass(frozen=True)
class ClassImages:
    """Images grouped by class, stored once in memory.

    ``images`` is uint8 ``[M, C, H, W]`` in final form; class ``c`` owns rows
    ``class_start[c] : class_start[c] + class_count[c]``.
    """

    images: torch.Tensor
    class_start: torch.Tensor
    class_count: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [M, C, H, W], got {self.images.dtype}")
        n = len(self.class_names)
        if self.class_start.shape != (n,) or self.class_count.shape != (n,):
            raise ValueError("class_start, class_count and class_names must have one entry a class")

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @classmethod
    def from_counts(
        cls, images: torch.Tensor, counts: Sequence[int], names: Sequence[str]
    ) -> ClassImages:
        """Wrap ``images`` whose rows are grouped by class, ``counts[c]`` rows for class ``c``."""
        count = torch.tensor(list(counts), dtype=torch.int64)
        return cls(images, torch.cumsum(count, 0) - count, count, tuple(names))

    @classmethod
    def concat(cls, parts: Sequence[ClassImages]) -> ClassImages:
        """The classes of ``parts``, in order, as one :class:`ClassImages`."""
        if len(parts) == 1:
            return parts[0]
        offsets = torch.tensor([0] + [len(p.images) for p in parts[:-1]]).cumsum(0)
        return cls(
            torch.cat([p.images for p in parts]),
            torch.cat([p.class_start + off for p, off in zip(parts, offsets, strict=True)]),
            torch.cat([p.class_count for p in parts]),
            tuple(name for p in parts for name in p.class_names),
        )


def check_image_format(image_size: int, channels: int) -> None:
    """Raise :class:`ConfigError` unless ``image_size >= 1`` and ``channels`` is 1 or 3."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size={image_size!r} is invalid; use a positive integer like 28")
    if channels not in _MODES:
        raise ConfigError(f"channels={channels!r} is invalid; use 1 (grayscale) or 3 (RGB)")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white, so a drawing on a transparent
    background reads as dark on light (as it is shown) rather than dark on black."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba)
    return image


def _resized_pixels(source: Path | bytes, size: tuple[int, int], mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.draft(mode, size)  # JPEG: decode at reduced scale (>= size)
        converted = _on_white(image).convert(mode)
        return np.asarray(converted.resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)


def decode_image(
    source: Path | bytes, name: str, *, image_size: int, channels: int, invert: bool
) -> np.ndarray:
    """Decode one image file (a path or its bytes) to uint8 ``[C, image_size, image_size]``."""
    size = (image_size, image_size)
    try:
        # A large photo is resized at once, so PIL's DecompressionBombWarning (over ~89 Mpixel) is
        # noise; its DecompressionBombError (over twice that) is still refused below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pixels = _resized_pixels(source, size, _MODES[channels])
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read image {name} ({' '.join(str(exc).split())}); replace or remove it"
        ) from exc
    pixels = pixels.reshape(image_size, image_size, channels).transpose(2, 0, 1)
    return np.ascontiguousarray(255 - pixels if invert else pixels)


def _decode_files(
    paths: Sequence[Path], image_size: int, channels: int, invert: bool
) -> np.ndarray:
    out = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_image(
            path, str(path), image_size=image_size, channels=channels, invert=invert
        )
    return out


def map_chunks(func: Callable[[Sequence[T]], np.ndarray], items: Sequence[T]) -> np.ndarray:
    """``func`` applied to contiguous chunks of ``items`` and concatenated, in a process pool.

    The pool (``fork``, Linux only, up to 8 workers) is used only when there are enough items to
    pay for it; the result is the same either way.
    """
    if not sys.platform.startswith("linux"):
        return func(items)
    workers = min(_MAX_WORKERS, len(os.sched_getaffinity(0)), len(items) // _MIN_PER_WORKER)
    if workers < 2:
        return func(items)
    n_chunks = workers * 4
    bounds = [len(items) * i // n_chunks for i in range(n_chunks + 1)]
    chunks = [items[a:b] for a, b in itertools.pairwise(bounds)]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        return np.concatenate(list(pool.map(func, chunks)))


def load_images(
    paths: Sequence[Path], *, image_size: int, channels: int, invert: bool = False
) -> torch.Tensor:
    """Decode image files into one uint8 tensor ``[n, channels, image_size, image_size]``."""
    check_image_format(image_size, channels)
    decode = functools.partial(
        _decode_files, image_size=image_size, channels=channels, invert=invert
    )
    if not paths:
        return torch.empty((0, channels, image_size, image_size), dtype=torch.uint8)
    return torch.from_numpy(map_chunks(decode, [Path(p) for p in paths]))


def class_folder_images(folder: Path) -> list[Path]:
    """The image files of a class folder, sorted; hidden entries skipped, anything else an error."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{entry} is not an image (expected {', '.join(sorted(IMAGE_SUFFIXES))}); "
                "remove it or move it out of the class folder"
            )
        files.append(entry)
    if not files:
        raise DataError(f"class folder {folder} holds no images; add images or remove the folder")
    return files


def load_image_folder(
    path: str | Path, *, image_size: int, channels: int, invert: bool = False
) -> ClassImages:
    """Load an ImageFolder layout: one sub-folder per class (sorted by name), images inside."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass a folder of class sub-folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class sub-folders; put one sub-folder of images per class")
    files = [class_folder_images(folder) for folder in folders]
    images = load_images(
        [f for group in files for f in group],
        image_size=image_size,
        channels=channels,
        invert=invert,
    )
    return ClassImages.from_counts(images, [len(g) for g in files], [f.name for f in folders])
