"""Omniglot: archive verification, downloads, the decode cache and the fixed splits."""

from __future__ import annotations

import io
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from metalstm.data import LAKE_VAL_ALPHABETS, ClassImages, load_split, omniglot_counts, storage
from metalstm.data import omniglot as om
from metalstm.errors import DataError

COUNTS = {
    "images_background": {"alphabets": 30, "characters": 964, "images": 19280},
    "images_evaluation": {"alphabets": 20, "characters": 659, "images": 13180},
}
SPLIT_SIZES = {
    "vinyals": {"train": 4112, "val": 688, "test": 1692, "trainval": 4800},
    "lake": {"train": 3168, "val": 688, "test": 2636, "trainval": 3856},
}


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def characters(data: ClassImages) -> set[str]:
    return {name.rsplit("/", 1)[0] for name in data.class_names}


def make_root(tmp_path: Path, data_root: Path, *, splits: bool = True) -> Path:
    """A data root in tmp_path whose archives (and split files) link to the real ones."""
    folder = tmp_path / "root" / "omniglot"
    folder.mkdir(parents=True)
    for name in om.ARCHIVES:
        (folder / f"{name}.zip").symlink_to(data_root / "omniglot" / f"{name}.zip")
    if splits:
        shutil.copytree(data_root / "omniglot" / "splits", folder / "splits")
    return folder.parent


def rewrite_zip(src: Path, dst: Path, keep: Callable[[str], bool] = lambda name: True) -> None:
    """Copy the members of ``src`` that ``keep`` accepts into ``dst``, uncompressed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if keep(info.filename):
                zout.writestr(info.filename, zin.read(info))


def fake_decode(archives: list[om.Archive], image_size: int) -> np.ndarray:
    n = sum(len(m) for a in archives for m in a.members)
    return np.zeros((n, 1, image_size, image_size), dtype=np.uint8)


@pytest.fixture(scope="module")
def splits(data_root: Path, session_cache: Path) -> dict[tuple[str, str], ClassImages]:
    """Every part of both splits, loaded once for this module (decodes into the session cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METALSTM_CACHE", str(session_cache))
        return {
            (split, part): load_split("omniglot", split, part, data_root=data_root)
            for split in SPLIT_SIZES
            for part in SPLIT_SIZES[split]
        }


# -- archives -------------------------------------------------------------------------------------
def test_counts_of_the_shared_archives(data_env: Path) -> None:
    assert omniglot_counts() == COUNTS
    assert omniglot_counts(data_env) == COUNTS


def test_truncated_archive_is_rejected(tmp_path: Path, data_root: Path) -> None:
    root = make_root(tmp_path, data_root)
    target = root / "omniglot" / "images_background.zip"
    target.unlink()
    target.write_bytes((data_root / "omniglot" / "images_background.zip").read_bytes()[:100_000])
    with pytest.raises(DataError) as exc:
        omniglot_counts(root)
    assert str(target) in one_line(exc) and "download" in str(exc.value)


def test_wrong_archive_is_rejected(tmp_path: Path, data_root: Path) -> None:
    root = make_root(tmp_path, data_root)
    target = root / "omniglot" / "images_background.zip"
    target.unlink()
    with zipfile.ZipFile(target, "w") as zf:
        zf.writestr("something/else.txt", "not omniglot")
    with pytest.raises(DataError, match="0 alphabets / 0 characters, expected 30 / 964") as exc:
        omniglot_counts(root)
    assert str(target) in one_line(exc)


def test_archive_missing_a_character(tmp_path: Path, data_root: Path) -> None:
    root = make_root(tmp_path, data_root)
    target = root / "omniglot" / "images_evaluation.zip"
    target.unlink()
    source = data_root / "omniglot" / "images_evaluation.zip"
    rewrite_zip(source, target, lambda name: "/Angelic/character05/" not in name)
    with pytest.raises(DataError, match="658 characters, expected 20 / 659") as exc:
        omniglot_counts(root)
    assert str(target) in one_line(exc)


def test_archive_missing_a_drawing(tmp_path: Path) -> None:
    names = [
        f"images_evaluation/Alphabet{i % 20:02d}/character{i // 20 + 1:02d}/{d:02d}.png"
        for i in range(659)
        for d in range(20)
    ]
    names.remove("images_evaluation/Alphabet03/character07/05.png")
    archive = om._index_members(tmp_path / "e.zip", "images_evaluation", names)
    assert archive.counts()["characters"] == 659
    with pytest.raises(DataError, match="Alphabet03/character07 has 19 drawings, expected 20"):
        om._check_counts(archive, "fix it")


def test_recompressed_archive_is_verified_by_content(tmp_path: Path, data_root: Path) -> None:
    root = make_root(tmp_path, data_root)
    target = root / "omniglot" / "images_evaluation.zip"
    target.unlink()
    rewrite_zip(data_root / "omniglot" / "images_evaluation.zip", target)
    assert omniglot_counts(root) == COUNTS
    # flip one byte of a stored PNG: the CRC check of the content verification catches it
    with zipfile.ZipFile(target) as zf:
        info = next(i for i in reversed(zf.infolist()) if i.filename.endswith(".png"))
    data = bytearray(target.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match="fails its CRC check"):
        omniglot_counts(root)


def test_missing_archive_under_explicit_root(tmp_path: Path, data_root: Path) -> None:
    root = make_root(tmp_path, data_root)
    (root / "omniglot" / "images_evaluation.zip").unlink()
    with pytest.raises(DataError) as exc:
        omniglot_counts(root)
    message = one_line(exc)
    assert str(root / "omniglot" / "images_evaluation.zip") in message
    assert om.ARCHIVE_URL.format(name="images_evaluation") in message


@pytest.fixture
def no_explicit_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data root given: the per-user cache (in tmp_path) is the root; downloads allowed."""
    monkeypatch.delenv("METALSTM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "metalstm"


def test_offline_download_fails_with_one_line(
    no_explicit_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as exc:
        omniglot_counts()
    message = one_line(exc)
    assert str(no_explicit_root / "omniglot" / "images_background.zip") in message
    assert om.ARCHIVE_URL.format(name="images_background") in message
    assert "no network" in message
    assert not (no_explicit_root / "omniglot" / "images_background.zip").exists()


def serve(files: dict[str, Path]) -> Callable[[str, float], io.BytesIO]:
    """A fake ``urlopen`` serving local files by URL."""

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        if url not in files:
            raise urllib.error.URLError(f"unexpected URL {url}")
        return io.BytesIO(files[url].read_bytes())

    return urlopen


def test_download_into_the_user_cache(
    no_explicit_root: Path,
    data_root: Path,
    session_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {
        om.ARCHIVE_URL.format(name=n): data_root / "omniglot" / f"{n}.zip" for n in om.ARCHIVES
    }
    files.update(
        {
            om.SPLIT_URL.format(part=p): data_root / "omniglot/splits/vinyals" / f"{p}.txt"
            for p in ("train", "val", "test")
        }
    )
    monkeypatch.setattr(urllib.request, "urlopen", serve(files))
    monkeypatch.setenv("METALSTM_CACHE", str(session_cache))
    assert omniglot_counts() == COUNTS
    assert (no_explicit_root / "omniglot" / "images_background.zip").is_file()
    data = load_split("omniglot", "vinyals", "val")
    assert data.n_classes == SPLIT_SIZES["vinyals"]["val"]
    assert (no_explicit_root / "omniglot/splits/vinyals/val.txt").is_file()


def test_downloaded_garbage_is_removed(
    no_explicit_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"<html>rate limited</html>")
    url = om.ARCHIVE_URL.format(name="images_background")
    monkeypatch.setattr(urllib.request, "urlopen", serve({url: garbage}))
    with pytest.raises(DataError, match="not a readable zip"):
        omniglot_counts()
    assert not (no_explicit_root / "omniglot" / "images_background.zip").exists()


# -- the decode cache -----------------------------------------------------------------------------
def test_cached_load_is_fast_and_does_not_decode(
    splits: object, data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(om, "decode_archives", pytest.fail)
    start = time.perf_counter()
    images = om.omniglot_images(28)
    assert time.perf_counter() - start < 2.0
    assert images.images.shape == (32460, 1, 28, 28)
    assert len(images.background) == 964 and len(images.evaluation) == 659


def test_decoded_images_are_inverted_and_anti_aliased(splits: object, data_env: Path) -> None:
    images = om.omniglot_images(28).images
    assert images.dtype == torch.uint8
    assert images[:, :, 0, 0].float().mean() < 1  # background (white paper) is 0
    assert images.amax(dim=(1, 2, 3)).min() > 100  # every drawing has bright strokes
    assert images.amax() == 255
    grey = ((images > 0) & (images < 255)).float().mean()
    assert grey > 0.01  # resized with anti-aliasing: intermediate grey levels exist


def test_cache_next_to_writable_data(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path, data_root)
    monkeypatch.delenv("METALSTM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(om, "decode_archives", fake_decode)
    om.omniglot_images(8, root)
    assert (root / "omniglot" / "cache" / f"omniglot-8px-v{om.CACHE_VERSION}.npz").is_file()
    assert not (tmp_path / "xdg").exists()


def test_cache_falls_back_to_user_folder_when_data_is_read_only(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path, data_root)
    monkeypatch.delenv("METALSTM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(om, "decode_archives", fake_decode)
    (root / "omniglot").chmod(0o555)
    try:
        om.omniglot_images(8, root)
    finally:
        (root / "omniglot").chmod(0o755)
    assert not (root / "omniglot" / "cache").exists()
    user = tmp_path / "xdg" / "metalstm" / "omniglot" / "cache"
    assert (user / f"omniglot-8px-v{om.CACHE_VERSION}.npz").is_file()


def test_no_writable_cache_folder(
    data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    monkeypatch.setenv("METALSTM_CACHE", str(read_only / "cache"))
    monkeypatch.setattr(om, "decode_archives", pytest.fail)  # fails before decoding anything
    with pytest.raises(DataError, match="no writable cache folder") as exc:
        om.omniglot_images(8)
    assert "METALSTM_CACHE" in one_line(exc)


def test_cache_write_is_atomic(
    data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("METALSTM_CACHE", str(cache))
    monkeypatch.setattr(om, "decode_archives", fake_decode)

    def disk_full(handle: io.BufferedWriter, **arrays: np.ndarray) -> None:
        handle.write(b"PK\x03\x04 half an npz")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.np, "savez", disk_full)
    with pytest.raises(DataError, match="No space left on device") as exc:
        om.omniglot_images(8)
    assert str(cache) in one_line(exc)
    assert os.listdir(cache) == []


def test_corrupt_cache_is_rebuilt(
    data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"omniglot-8px-v{om.CACHE_VERSION}.npz").write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setenv("METALSTM_CACHE", str(cache))
    monkeypatch.setattr(om, "decode_archives", fake_decode)
    assert om.omniglot_images(8).images.shape == (32460, 1, 8, 8)


def test_cache_of_another_dtype_is_rebuilt(
    data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALSTM_CACHE", str(tmp_path))
    monkeypatch.setattr(om, "decode_archives", fake_decode)
    path = tmp_path / f"omniglot-8px-v{om.CACHE_VERSION}.npz"
    om.omniglot_images(8)
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    np.savez(path, **{**arrays, "images": arrays["images"].astype(np.int16)})
    assert om.omniglot_images(8).images.dtype == torch.uint8


# -- splits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_split_sizes(splits: dict[tuple[str, str], ClassImages], split: str) -> None:
    for part, n_classes in SPLIT_SIZES[split].items():
        data = splits[split, part]
        assert data.n_classes == n_classes
        assert data.image_shape == (1, 28, 28)
        assert (data.class_count == 20).all()
        assert len(data.images) == 20 * n_classes


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_parts_share_no_character(splits: dict[tuple[str, str], ClassImages], split: str) -> None:
    train, val, test = (characters(splits[split, p]) for p in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert characters(splits[split, "trainval"]) == train | val
    assert len(train | val | test) == {"vinyals": 1623, "lake": 1623}[split]


def test_vinyals_follows_the_split_files(
    splits: dict[tuple[str, str], ClassImages], data_root: Path
) -> None:
    folder = data_root / "omniglot" / "splits" / "vinyals"
    for part in ("train", "val", "test", "trainval"):
        lines = (folder / f"{part}.txt").read_text().split()
        assert list(splits["vinyals", part].class_names) == lines


def test_lake_split_is_fixed_by_alphabet(splits: dict[tuple[str, str], ClassImages]) -> None:
    alphabets = {
        p: {n.split("/")[0] for n in splits["lake", p].class_names} for p in ("val", "test")
    }
    assert alphabets["val"] == set(LAKE_VAL_ALPHABETS)
    assert "Angelic" in alphabets["test"] and len(alphabets["test"]) == 20


def test_rotations_are_counter_clockwise_quarter_turns(
    splits: dict[tuple[str, str], ClassImages],
) -> None:
    data = splits["vinyals", "val"]
    index = {name: i for i, name in enumerate(data.class_names)}

    def images(name: str) -> torch.Tensor:
        i = index[name]
        start = int(data.class_start[i])
        return data.images[start : start + int(data.class_count[i])]

    base = images("Armenian/character01/rot000")
    for degrees in (90, 180, 270):
        rotated = images(f"Armenian/character01/rot{degrees:03d}")
        assert torch.equal(rotated, torch.rot90(base, degrees // 90, dims=(-2, -1)))


def test_splits_are_identical_on_reload(
    splits: dict[tuple[str, str], ClassImages], data_env: Path
) -> None:
    again = load_split("omniglot", "lake", "val")
    assert again.class_names == splits["lake", "val"].class_names
    assert torch.equal(again.images, splits["lake", "val"].images)


def test_three_channels(splits: object, data_env: Path) -> None:
    data = load_split("omniglot", "vinyals", "val", channels=3)
    assert data.image_shape == (3, 28, 28)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("Angelic/character99/rot000", "unknown Omniglot character"),
        ("Angelic/character01/rot045", "is not Alphabet/characterNN/rotDDD"),
        ("Angelic/character01", "is not Alphabet/characterNN/rotDDD"),
        ("Angelic/character01/rot000", "listed twice"),
    ],
)
def test_bad_split_file_line(
    tmp_path: Path,
    data_root: Path,
    session_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    line: str,
    match: str,
) -> None:
    monkeypatch.setenv("METALSTM_CACHE", str(session_cache))
    root = make_root(tmp_path, data_root)
    split_file = root / "omniglot" / "splits" / "vinyals" / "test.txt"
    split_file.write_text("Angelic/character01/rot000\n" + line + "\n")
    with pytest.raises(DataError, match=match) as exc:
        load_split("omniglot", "vinyals", "test", data_root=root)
    assert f"{split_file}:2" in one_line(exc)


def test_binary_split_file_is_one_line(
    tmp_path: Path, data_root: Path, session_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALSTM_CACHE", str(session_cache))
    root = make_root(tmp_path, data_root)
    split_file = root / "omniglot" / "splits" / "vinyals" / "test.txt"
    split_file.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(DataError, match="is not Alphabet/characterNN/rotDDD") as exc:
        load_split("omniglot", "vinyals", "test", data_root=root)
    assert str(split_file) in one_line(exc)


def test_missing_split_file_under_explicit_root(
    tmp_path: Path, data_root: Path, session_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALSTM_CACHE", str(session_cache))
    root = make_root(tmp_path, data_root, splits=False)
    with pytest.raises(DataError) as exc:
        load_split("omniglot", "vinyals", "val", data_root=root)
    assert om.SPLIT_URL.format(part="val") in one_line(exc)
