"""Omniglot: locating, verifying and decoding the archives, and the fixed class splits.

Archives: ``<data root>/omniglot/images_background.zip`` and ``images_evaluation.zip``
(downloaded from the official repository into the per-user cache when no data root was given).
An archive is accepted when its md5 or sha256 is a known one (official, or the re-compressed
copies described in ``shared/data/omniglot/SOURCE.md``), else by content: every member passes its
CRC check, the alphabet / character / image counts are the official ones, every character has 20
drawings.

Decoding: all 32,460 PNGs are read straight from the zips once, resized to ``image_size`` with
Lanczos anti-aliasing and inverted (strokes = 255), then cached as one uint8 array (see
:mod:`metalstm.data.storage` for where).

Classes: a character drawn at one rotation, named ``Alphabet/characterNN/rotDDD``; ``rotDDD`` is
the drawing turned DDD degrees counter-clockwise (``torch.rot90(x, DDD // 90, dims=(-2, -1))``,
like ``numpy.rot90`` and Pillow's ``Image.rotate``). Splits never depend on a seed:

* ``vinyals``: the published 1028 / 172 / 423-character lists (split files), x 4 rotations.
* ``lake``: train and val from the 30 background alphabets, :data:`LAKE_VAL_ALPHABETS` held out
  for val; test = the 20 evaluation alphabets; x 4 rotations.

``trainval`` is always train followed by val (for ``vinyals`` identical to ``trainval.txt``).
"""

from __future__ import annotations

import contextlib
import functools
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .images import ClassImages, decode_image, map_chunks
from .storage import DataRoot, cache_dirs, download, file_digests, find_data_root
from .storage import load_or_build_arrays as _load_or_build

BACKGROUND = "images_background"
EVALUATION = "images_evaluation"
ARCHIVES = (BACKGROUND, EVALUATION)
ARCHIVE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
SPLIT_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/"
    "data/omniglot/splits/vinyals/{part}.txt"
)
#: md5 of the official archives and sha256 of the re-compressed copies in shared/data/omniglot.
KNOWN_DIGESTS = {
    BACKGROUND: frozenset(
        {
            "68d2efa1b9178cc56df9314c21c6e718",
            "a5fc79093341e8d800b1146ef11a64ff070ee16367f6c432810de6b9ba5341b3",
        }
    ),
    EVALUATION: frozenset(
        {
            "6b91aef0f799c5bb55b94e3f2daec811",
            "a623286fa404ff48b7ae17a512cb5452423a971c5d2b095bf2d89eab8e5740c8",
        }
    ),
}
#: (alphabets, characters, images) of each archive.
EXPECTED_COUNTS = {BACKGROUND: (30, 964, 19280), EVALUATION: (20, 659, 13180)}
DRAWINGS_PER_CHARACTER = 20
ROTATIONS = (0, 90, 180, 270)
#: The background alphabets held out for validation by the ``lake`` split: the five alphabets of
#: the ``vinyals`` validation split (172 characters), so both splits validate on the same scripts.
LAKE_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
SPLITS = ("vinyals", "lake")
PARTS = ("train", "val", "test", "trainval")
CACHE_VERSION = 1  # bump when decoding changes
_SPLIT_LINE = re.compile(r"^(?P<char>[^/\s]+/character\d+)/rot(?P<deg>\d{3})$")


@dataclass(frozen=True)
class Archive:
    """A verified Omniglot archive: its characters (``Alphabet/characterNN``) and their PNGs."""

    name: str
    path: Path
    characters: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]

    def counts(self) -> dict[str, int]:
        """``{"alphabets", "characters", "images"}`` of this archive."""
        return {
            "alphabets": len({c.split("/")[0] for c in self.characters}),
            "characters": len(self.characters),
            "images": sum(len(m) for m in self.members),
        }


def omniglot_counts(data_root: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Locate (download if needed) and verify both archives; their alphabets/characters/images."""
    return {archive.name: archive.counts() for archive in locate_archives(data_root)}


def locate_archives(data_root: str | Path | None = None) -> list[Archive]:
    """Both verified archives under ``<data root>/omniglot``; missing ones downloaded if allowed."""
    root = find_data_root(data_root)
    return [open_archive(archive_path(root, name), name) for name in ARCHIVES]


def archive_path(root: DataRoot, name: str) -> Path:
    """Where archive ``name`` is; downloaded (and verified) first when missing and allowed."""
    path = root.path / "omniglot" / f"{name}.zip"
    url = ARCHIVE_URL.format(name=name)
    if path.is_file():
        return path
    if root.explicit:
        raise DataError(f"Omniglot archive {path} is missing; download {url} and save it there")
    download(url, path, f"Omniglot archive {path}")
    try:
        open_archive(path, name)
    except DataError:
        path.unlink(missing_ok=True)
        raise
    return path


def open_archive(path: Path, name: str) -> Archive:
    """Verify ``path`` as the Omniglot archive ``name`` (by checksum, else by content)."""
    fix = f"delete it and download {ARCHIVE_URL.format(name=name)} again"
    try:
        known = bool(set(file_digests(path)) & KNOWN_DIGESTS[name])
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            broken = None if known else zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable zip archive ({exc}); {fix}") from exc
    if broken is not None:
        raise DataError(f"{path} is corrupted ({broken} fails its CRC check); {fix}")
    archive = _index_members(path, name, names)
    _check_counts(archive, fix)
    return archive


def _index_members(path: Path, name: str, names: Sequence[str]) -> Archive:
    groups: dict[str, list[str]] = {}
    for member in names:
        parts = member.split("/")
        if len(parts) == 4 and parts[0] == name and parts[3].lower().endswith(".png"):
            groups.setdefault(f"{parts[1]}/{parts[2]}", []).append(member)
    characters = tuple(sorted(groups))
    return Archive(name, path, characters, tuple(tuple(sorted(groups[c])) for c in characters))


def _check_counts(archive: Archive, fix: str) -> None:
    counts = archive.counts()
    alphabets, characters, _ = EXPECTED_COUNTS[archive.name]
    if (counts["alphabets"], counts["characters"]) != (alphabets, characters):
        raise DataError(
            f"{archive.path} holds {counts['alphabets']} alphabets / {counts['characters']} "
            f"characters, expected {alphabets} / {characters}; {fix}"
        )
    for character, members in zip(archive.characters, archive.members, strict=True):
        if len(members) != DRAWINGS_PER_CHARACTER:
            raise DataError(
                f"{archive.path}: {character} has {len(members)} drawings, expected "
                f"{DRAWINGS_PER_CHARACTER}; {fix}"
            )


@dataclass(frozen=True)
class OmniglotImages:
    """All decoded drawings (uint8 ``[M, 1, S, S]``, inverted) and the rows of each character."""

    images: torch.Tensor
    rows: dict[str, tuple[int, int]]  # character -> (first row, count)
    background: tuple[str, ...]
    evaluation: tuple[str, ...]


def omniglot_images(image_size: int, data_root: str | Path | None = None) -> OmniglotImages:
    """Decode (first use) or load from the cache every Omniglot drawing at ``image_size``.

    The cache records the sha256 of the archives it was decoded from, so a cached load needs no
    more than hashing them; a new archive is verified in full and decoded again.
    """
    root = find_data_root(data_root)
    paths = [archive_path(root, name) for name in ARCHIVES]
    digests = np.array([file_digests(path)[1] for path in paths])

    def build() -> Mapping[str, np.ndarray]:
        archives = [open_archive(path, name) for path, name in zip(paths, ARCHIVES, strict=True)]
        return {
            "images": decode_archives(archives, image_size),
            "characters": np.array([c for a in archives for c in a.characters]),
            "counts": np.array([len(m) for a in archives for m in a.members], dtype=np.int64),
            "archive_characters": np.array([len(a.characters) for a in archives]),
            "sha256": digests,
        }

    def is_valid(arrays: Mapping[str, np.ndarray]) -> bool:
        return (
            set(arrays) == {"images", "characters", "counts", "archive_characters", "sha256"}
            and np.array_equal(arrays["sha256"], digests)
            and arrays["images"].dtype == np.uint8
            and arrays["images"].shape == (arrays["counts"].sum(), 1, image_size, image_size)
            and len(arrays["characters"]) == len(arrays["counts"])
        )

    arrays = _load_or_build(
        f"omniglot-{image_size}px-v{CACHE_VERSION}.npz",
        cache_dirs(paths[0].parent, "omniglot"),
        build,
        is_valid,
    )
    characters = [str(c) for c in arrays["characters"]]
    counts = arrays["counts"]
    starts = np.cumsum(counts) - counts
    rows = {c: (int(s), int(n)) for c, s, n in zip(characters, starts, counts, strict=True)}
    n_background = int(arrays["archive_characters"][0])
    return OmniglotImages(
        torch.from_numpy(arrays["images"]),
        rows,
        tuple(characters[:n_background]),
        tuple(characters[n_background:]),
    )


def decode_archives(archives: Sequence[Archive], image_size: int) -> np.ndarray:
    """Decode every drawing of ``archives`` (by character, then file name) in a process pool."""
    items = [(str(a.path), m) for a in archives for members in a.members for m in members]
    return map_chunks(functools.partial(_decode_members, image_size=image_size), items)


def _decode_members(items: Sequence[tuple[str, str]], image_size: int) -> np.ndarray:
    out = np.empty((len(items), 1, image_size, image_size), dtype=np.uint8)
    with contextlib.ExitStack() as stack:
        open_zips: dict[str, zipfile.ZipFile] = {}
        for i, (zip_path, member) in enumerate(items):
            if zip_path not in open_zips:
                open_zips[zip_path] = stack.enter_context(zipfile.ZipFile(zip_path))
            try:
                data = open_zips[zip_path].read(member)
            except (zipfile.BadZipFile, OSError, zlib.error) as exc:
                raise DataError(
                    f"cannot read {member} from {zip_path} ({exc}); re-download it"
                ) from exc
            name = f"{zip_path}:{member}"
            out[i] = decode_image(data, name, image_size=image_size, channels=1, invert=True)
    return out


def load_omniglot(
    split: str, part: str, *, data_root: str | Path | None, image_size: int, channels: int
) -> ClassImages:
    """The classes of ``part`` of the Omniglot ``split`` (see the module docstring)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown Omniglot split {split!r}; use one of {', '.join(SPLITS)}")
    if part not in PARTS:
        raise ConfigError(f"unknown split part {part!r}; use one of {', '.join(PARTS)}")
    data = omniglot_images(image_size, data_root)
    parts = ("train", "val") if part == "trainval" else (part,)
    if split == "vinyals":
        root = find_data_root(data_root)
        classes = [c for p in parts for c in vinyals_classes(root, p, data.rows)]
    else:
        classes = [c for p in parts for c in lake_classes(p, data)]
    return rotated_classes(data, classes, channels)


def vinyals_classes(
    root: DataRoot, part: str, known: dict[str, tuple[int, int]]
) -> list[tuple[str, int]]:
    """``(character, degrees)`` of each class listed in the ``vinyals`` split file of ``part``."""
    path = root.path / "omniglot" / "splits" / "vinyals" / f"{part}.txt"
    url = SPLIT_URL.format(part=part)
    if not path.is_file():
        if root.explicit:
            raise DataError(f"Omniglot split file {path} is missing; download {url} there")
        download(url, path, f"Omniglot split file {path}")
    return parse_split_file(path, known)


def parse_split_file(path: Path, known: dict[str, tuple[int, int]]) -> list[tuple[str, int]]:
    """Parse ``Alphabet/characterNN/rotDDD`` lines; unknown or malformed lines are errors."""
    classes: list[tuple[str, int]] = []
    seen: set[str] = set()
    fix = "fix the line or restore the published split file"
    try:  # undecodable bytes become U+FFFD, which no valid line contains
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read split file {path} ({exc.strerror or exc}); {fix}") from None
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        match = _SPLIT_LINE.match(line)
        if match is None or int(match["deg"]) not in ROTATIONS:
            raise DataError(f"{path}:{lineno}: {line!r} is not Alphabet/characterNN/rotDDD; {fix}")
        if match["char"] not in known:
            raise DataError(f"{path}:{lineno}: unknown Omniglot character {line!r}; {fix}")
        if line in seen:
            raise DataError(f"{path}:{lineno}: class {line!r} is listed twice; {fix}")
        seen.add(line)
        classes.append((match["char"], int(match["deg"])))
    if not classes:
        raise DataError(f"split file {path} lists no classes; {fix}")
    return classes


def lake_classes(part: str, data: OmniglotImages) -> list[tuple[str, int]]:
    """``(character, degrees)`` of each class of ``part`` of the ``lake`` split."""
    if part == "test":
        characters = data.evaluation
    else:
        held_out = part == "val"
        characters = tuple(
            c for c in data.background if (c.split("/")[0] in LAKE_VAL_ALPHABETS) == held_out
        )
    return [(c, degrees) for c in characters for degrees in ROTATIONS]


def rotated_classes(
    data: OmniglotImages, classes: Sequence[tuple[str, int]], channels: int
) -> ClassImages:
    """Materialise ``classes`` (character, degrees counter-clockwise) as :class:`ClassImages`."""
    starts = torch.tensor([data.rows[c][0] for c, _ in classes], dtype=torch.int64)
    counts = torch.tensor([data.rows[c][1] for c, _ in classes], dtype=torch.int64)
    turns = torch.tensor([degrees // 90 for _, degrees in classes], dtype=torch.int64)
    first_out = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(first_out, counts)
    # All four rotations of every drawing, stacked, then one gather: [turn * M + row].
    rotations = torch.cat([torch.rot90(data.images, k, dims=(-2, -1)) for k in range(4)])
    rows = torch.repeat_interleave(turns * len(data.images) + starts, counts) + offsets
    images = rotations.index_select(0, rows)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    names = [f"{c}/rot{d:03d}" for c, d in classes]
    return ClassImages(images, first_out, counts, tuple(names))
