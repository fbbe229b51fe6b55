"""Other image sources (ImageFolder, miniImageNet in the Ravi layout), the decoder, data roots."""

from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder, write_image
from metalstm.data import (
    EpisodeSampler,
    load_image_folder,
    load_images,
    load_split,
    resolve_data_root,
)
from metalstm.data import images as images_module
from metalstm.data import miniimagenet as mini
from metalstm.errors import ConfigError, DataError


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- data roots -----------------------------------------------------------------------------------
def test_data_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "arg").mkdir()
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("METALSTM_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("METALSTM_DATA")
    assert resolve_data_root() == tmp_path / "xdg" / "metalstm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "metalstm"


def test_missing_explicit_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="is not a folder") as exc:
        resolve_data_root(tmp_path / "nope")
    assert str(tmp_path / "nope") in one_line(exc)
    monkeypatch.setenv("METALSTM_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$METALSTM_DATA"):
        resolve_data_root()


# -- the decoder ----------------------------------------------------------------------------------
def test_load_images_converts_modes_and_sizes(tmp_path: Path) -> None:
    paths = [
        write_image(tmp_path / "a.png", size=(30, 20), mode="RGB"),
        write_image(tmp_path / "b.png", size=(8, 50), mode="L"),
        write_image(tmp_path / "c.png", size=(40, 40), mode="RGBA"),
        write_image(tmp_path / "d.gif", size=(12, 12), mode="P"),
        write_image(tmp_path / "e.png", size=(105, 105), mode="1"),
        write_image(tmp_path / "f.jpg", size=(300, 200), mode="RGB"),
    ]
    rgb = load_images(paths, image_size=16, channels=3)
    assert rgb.shape == (6, 3, 16, 16) and rgb.dtype == torch.uint8
    gray = load_images(paths, image_size=9, channels=1)
    inverted = load_images(paths, image_size=9, channels=1, invert=True)
    assert gray.shape == (6, 1, 9, 9)
    assert torch.equal(inverted, 255 - gray)
    assert load_images([], image_size=9, channels=1).shape == (0, 1, 9, 9)


def test_white_image_decodes_to_255(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (50, 40), (255, 255, 255)).save(tmp_path / "white.png")
    out = load_images([tmp_path / "white.png"], image_size=7, channels=3)
    assert (out == 255).all()


def test_unreadable_image(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="cannot read image") as exc:
        load_images([bad], image_size=8, channels=1)
    assert str(bad) in one_line(exc)


def _double(items: Sequence[int]) -> np.ndarray:
    return np.array(items, dtype=np.int64) * 2


def test_process_pool_gives_the_serial_result() -> None:
    items = list(range(3000))
    assert np.array_equal(images_module.map_chunks(_double, items), _double(items))


@pytest.mark.parametrize(("size", "channels"), [(0, 1), (28, 2), (28, 4)])
def test_bad_image_format(size: int, channels: int) -> None:
    with pytest.raises(ConfigError):
        load_images([], image_size=size, channels=channels)


# -- ImageFolder ----------------------------------------------------------------------------------
def test_image_folder(tmp_path: Path) -> None:
    root = make_image_folder(
        tmp_path / "f", {"zebra": 3, "apple": 5, "mango": 4}, modes=("RGB", "L", "P")
    )
    (root / "apple" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    (root / ".git").mkdir()  # hidden folders are not classes
    (root / "README.txt").write_text("top-level files are not classes")
    data = load_image_folder(root, image_size=12, channels=3)
    assert data.class_names == ("apple", "mango", "zebra")
    assert data.class_count.tolist() == [5, 4, 3]
    assert data.class_start.tolist() == [0, 5, 9]
    assert data.images.shape == (12, 3, 12, 12)
    gray = load_image_folder(root, image_size=10, channels=1)
    assert gray.image_shape == (1, 10, 10)
    episode = EpisodeSampler(data, 3, 1, 2, seed=0).episode(0)
    assert episode.support_x.shape == (3, 3, 12, 12)


def test_image_folder_with_a_non_image_file(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "f", {"a": 2, "b": 2})
    (root / "b" / "notes.txt").write_text("oops")
    with pytest.raises(DataError, match="is not an image") as exc:
        load_image_folder(root, image_size=8, channels=1)
    assert str(root / "b" / "notes.txt") in one_line(exc)


def test_image_folder_with_an_empty_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "f", {"a": 2})
    (root / "empty").mkdir()
    (root / "empty" / ".hidden.png").write_bytes(b"")
    with pytest.raises(DataError, match="holds no images") as exc:
        load_image_folder(root, image_size=8, channels=1)
    assert str(root / "empty") in one_line(exc)


def test_image_folder_without_classes(tmp_path: Path) -> None:
    write_image(tmp_path / "f" / "loose.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "f", image_size=8, channels=1)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", image_size=8, channels=1)


def test_image_folder_with_an_unreadable_image(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "f", {"a": 2, "b": 2})
    (root / "a" / "zz.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image") as exc:
        load_image_folder(root, image_size=8, channels=1)
    assert str(root / "a" / "zz.jpg") in one_line(exc)


def test_folder_dataset_parts(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_image_folder(root / "train", {"a": 3, "b": 3})
    make_image_folder(root / "val", {"c": 3})
    make_image_folder(root / "test", {"d": 3, "e": 3, "f": 3})
    assert load_split("folder", "", "test", data_root=root, image_size=8).class_names == (
        "d",
        "e",
        "f",
    )
    trainval = load_split("folder", "", "trainval", data_root=root, image_size=8, channels=1)
    assert trainval.class_names == ("a", "b", "c")
    assert trainval.class_start.tolist() == [0, 3, 6] and trainval.image_shape == (1, 8, 8)
    default = load_split("folder", "", "train", data_root=root)
    assert default.image_shape == (3, 84, 84)


def test_folder_dataset_without_parts_and_missing_part(tmp_path: Path) -> None:
    flat = make_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    assert load_split("folder", "", "val", data_root=flat, image_size=8).n_classes == 2
    partial = tmp_path / "partial"
    make_image_folder(partial / "train", {"a": 2})
    with pytest.raises(DataError, match="no test/"):
        load_split("folder", "", "test", data_root=partial, image_size=8)


# -- miniImageNet (Ravi layout) -------------------------------------------------------------------
RAVI_PARTS = {"train": ["n01", "n02", "n03"], "val": ["n04"], "test": ["n05", "n06"]}


def make_ravi(folder: Path, per_class: int = 8) -> Path:
    """6 classes x ``per_class`` random-colour 100x90 JPEGs with Ravi CSVs."""
    for part, labels in RAVI_PARTS.items():
        rows = []
        for label in labels:
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                write_image(
                    folder / "images" / name, size=(100, 90), seed=zlib.crc32(name.encode())
                )
                rows.append((name, label))
        with (folder / f"{part}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            writer.writerows(reversed(rows))  # class order comes from the labels, not the rows
    return folder


@pytest.fixture
def ravi_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("METALSTM_CACHE", str(tmp_path / "cache"))
    make_ravi(tmp_path / "data" / "miniimagenet")
    return tmp_path / "data"


def test_miniimagenet_layout(ravi_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = load_split("miniimagenet", "ravi", "train", data_root=ravi_root)
    assert train.class_names == ("n01", "n02", "n03")
    assert train.images.shape == (24, 3, 84, 84) and train.class_count.tolist() == [8, 8, 8]
    episode = EpisodeSampler(train, 3, 2, 3, seed=0).episode(0)
    assert episode.support_x.shape == (6, 3, 84, 84) and episode.query_x.shape == (9, 3, 84, 84)
    # pointing at the folder itself works too, and the decoded images come from the cache
    monkeypatch.setattr(mini, "load_images", pytest.fail)
    again = load_split("miniimagenet", "ravi", "train", data_root=ravi_root / "miniimagenet")
    assert torch.equal(again.images, train.images)
    assert (ravi_root.parent / "cache").is_dir()


def test_miniimagenet_parts_and_sizes(ravi_root: Path) -> None:
    trainval = load_split("miniimagenet", "ravi", "trainval", data_root=ravi_root, image_size=32)
    assert trainval.class_names == ("n01", "n02", "n03", "n04")
    assert trainval.image_shape == (3, 32, 32)
    test = load_split(
        "miniimagenet", "ravi", "test", data_root=ravi_root, image_size=20, channels=1
    )
    assert test.images.shape == (16, 1, 20, 20)


def test_miniimagenet_missing_image(ravi_root: Path) -> None:
    missing = ravi_root / "miniimagenet" / "images" / "n0400000003.jpg"
    missing.unlink()
    with pytest.raises(DataError, match="is missing") as exc:
        load_split("miniimagenet", "ravi", "val", data_root=ravi_root)
    assert str(missing) in one_line(exc)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("file,class\nx.jpg,n01\n", "first line must be 'filename,label'"),
        ("filename,label\nx.jpg\n", ":2: expected 'filename,label'"),
        ("filename,label\n", "lists no images"),
    ],
)
def test_miniimagenet_bad_csv(ravi_root: Path, content: str, match: str) -> None:
    (ravi_root / "miniimagenet" / "val.csv").write_text(content)
    with pytest.raises(DataError, match=match) as exc:
        load_split("miniimagenet", "ravi", "val", data_root=ravi_root)
    assert "val.csv" in one_line(exc)


def test_miniimagenet_missing_csv_or_images(ravi_root: Path, tmp_path: Path) -> None:
    (ravi_root / "miniimagenet" / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test\.csv is missing"):
        load_split("miniimagenet", "ravi", "test", data_root=ravi_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="miniImageNet not found") as exc:
        load_split("miniimagenet", "ravi", "train", data_root=tmp_path / "empty")
    assert str(tmp_path / "empty" / "miniimagenet" / "images") in one_line(exc)


def test_miniimagenet_too_few_images_for_the_episode(ravi_root: Path) -> None:
    val = load_split("miniimagenet", "ravi", "val", data_root=ravi_root, image_size=8)
    with pytest.raises(DataError, match="class 'n04' has 8 images"):
        EpisodeSampler(val, 1, 5, 15, seed=0)
    test = load_split("miniimagenet", "ravi", "test", data_root=ravi_root, image_size=8)
    with pytest.raises(DataError, match="n_way=5 but the data has only 2 classes"):
        EpisodeSampler(test, 5, 1, 1, seed=0)


# -- load_split arguments -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "split", "part", "match"),
    [
        ("cifar", "x", "train", "unknown dataset 'cifar'"),
        ("omniglot", "random", "train", "unknown Omniglot split 'random'"),
        ("omniglot", "vinyals", "dev", "unknown split part 'dev'"),
        ("miniimagenet", "vinyals", "train", "unknown miniImageNet split"),
        ("miniimagenet", "ravi", "all", "unknown split part 'all'"),
        ("folder", "", "everything", "unknown split part 'everything'"),
    ],
)
def test_bad_load_split_arguments(
    dataset: str, split: str, part: str, match: str, tmp_path: Path
) -> None:
    (tmp_path / "miniimagenet" / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match=match):
        load_split(dataset, split, part, data_root=tmp_path)


@pytest.mark.parametrize("dataset", ["omniglot", "miniimagenet", "folder"])
def test_bad_image_format_in_load_split(dataset: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="channels=2"):
        load_split(dataset, "x", "train", data_root=tmp_path, channels=2)
    with pytest.raises(ConfigError, match="image_size=-3"):
        load_split(dataset, "x", "train", data_root=tmp_path, image_size=-3)


def test_transparent_background_reads_as_white(tmp_path: Path) -> None:
    """A dark stroke on a transparent background decodes as dark on light, as it is shown."""
    from PIL import Image

    from metalstm.data import load_images

    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    for i in range(20):
        image.putpixel((i, 10), (0, 0, 0, 255))
    image.save(tmp_path / "stroke.png")
    pixels = load_images([tmp_path / "stroke.png"], image_size=20, channels=1)
    assert pixels.float().mean() > 200  # mostly white background
    assert pixels.min() < 50  # the stroke stays dark
