"""Checkpoint files: round trip, atomic writes, corruption detection, safe loading, name lookup."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metalstm import checkpoint as ckpt
from metalstm.checkpoint import (
    list_pretrained,
    load_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from metalstm.errors import CheckpointError

META = {
    "algorithm": "metalstm",
    "episode": 1234,
    "config": {"n_way": 5, "k_shot": 1, "lr": 1e-3, "second_order": False, "name": ""},
    "history": [{"episode": 500, "acc": 0.61}, {"episode": 1000, "acc": 0.72}],
    "rng": {"torch": [1, 2, 3], "python": None},
    "empty_list": [],
    "empty_dict": {},
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lstm.weight": torch.randn(4, 7, generator=g),
        "cI": torch.randn(33, generator=g, dtype=torch.float64),
        "steps": torch.tensor(17, dtype=torch.int64),
        "opt.state.0.exp_avg": torch.randn(3, 5, generator=g).t(),  # non-contiguous
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "best", _tensors(), META)


def _assert_one_line_naming(exc: pytest.ExceptionInfo[CheckpointError], path: Path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg


# ------------------------------------------------------------------------------- round trip


def test_round_trip(saved: Path) -> None:
    assert saved.name == "best.safetensors"
    tensors, meta = load_checkpoint(saved)
    _assert_same(tensors, _tensors())
    assert meta == META
    assert read_checkpoint_meta(saved) == META
    assert list(saved.parent.iterdir()) == [saved]


def test_round_trip_empty_and_requires_grad(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "x.safetensors", {}, {})
    assert path == tmp_path / "x.safetensors"
    assert load_checkpoint(path) == ({}, {})
    w = torch.ones(3, requires_grad=True) * 2
    tensors, _ = load_checkpoint(save_checkpoint(tmp_path / "g", {"w": w}, {"a": [None]}))
    assert not tensors["w"].requires_grad and torch.equal(tensors["w"], w.detach())


def test_overwrite_replaces(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last", {"w": torch.zeros(2)}, {"episode": 1})
    save_checkpoint(path, {"w": torch.ones(2)}, {"episode": 2})
    tensors, meta = load_checkpoint(path)
    assert meta == {"episode": 2} and torch.equal(tensors["w"], torch.ones(2))


def test_unserialisable_meta_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "x", {}, {"f": object()})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ atomic


@pytest.mark.parametrize("failing", ["replace", "fsync", "serialise"])
def test_failed_write_keeps_previous_file(
    saved: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    before = saved.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    def bad_serialiser(*args: object, **kwargs: object) -> None:
        raise RuntimeError("serialiser crashed")

    if failing == "serialise":
        monkeypatch.setattr(ckpt, "_st_save", bad_serialiser)
        with pytest.raises(RuntimeError, match="serialiser crashed"):
            save_checkpoint(saved, {"w": torch.zeros(1)}, {"new": True})
    else:
        monkeypatch.setattr(os, failing, boom)
        with pytest.raises(CheckpointError, match="No space left") as exc:
            save_checkpoint(saved, {"w": torch.zeros(1)}, {"new": True})
        _assert_one_line_naming(exc, saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert list(saved.parent.iterdir()) == [saved]  # no temporary file left behind
    assert load_checkpoint(saved)[1] == META


# -------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.02, 0.3, 0.5, 0.9, 0.999])
def test_truncated_file_is_detected(saved: Path, fraction: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * fraction)])
    for read in (load_checkpoint, read_checkpoint_meta):
        with pytest.raises(CheckpointError) as exc:
            read(saved)
        _assert_one_line_naming(exc, saved)


def test_one_byte_short_is_truncated(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated") as exc:
        load_checkpoint(saved)
    _assert_one_line_naming(exc, saved)


def test_flipped_tensor_byte_fails_checksum(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's raw bytes
    saved.write_bytes(bytes(data))
    assert read_checkpoint_meta(saved) == META  # header-only read cannot see it ...
    with pytest.raises(CheckpointError, match=r"corrupted \(checksum mismatch\)") as exc:
        load_checkpoint(saved)  # ... the verified load does
    _assert_one_line_naming(exc, saved)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"metalstm\\", b"metalstn\\"), (b"1234", b"1235"), (b"0.72", b"0.73")],
)
def test_flipped_metadata_byte_fails_checksum(saved: Path, old: bytes, new: bytes) -> None:
    data = saved.read_bytes()
    assert data.count(old) == 1
    saved.write_bytes(data.replace(old, new))
    with pytest.raises(CheckpointError, match="checksum mismatch") as exc:
        load_checkpoint(saved)
    _assert_one_line_naming(exc, saved)


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a metalstm checkpoint") as exc:
        load_checkpoint(path)
    _assert_one_line_naming(exc, path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.safetensors", tmp_path):
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(path)
        _assert_one_line_naming(exc, path)


# -------------------------------------------------------------------------- malicious pickle


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.skipif(sys.platform == "win32", reason="payload uses a POSIX shell")
@pytest.mark.parametrize("kind", ["pickle", "torch.save", "torch.save-legacy"])
def test_malicious_pickle_never_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    evil = shipped / "evil.safetensors"  # a misleading suffix must not help either
    if kind == "pickle":
        evil.write_bytes(pickle.dumps(_Evil(marker)))
    else:
        torch.save(
            {"w": _Evil(marker)}, evil, _use_new_zipfile_serialization=(kind == "torch.save")
        )
    plain = tmp_path / "evil.pt"
    plain.write_bytes(evil.read_bytes())

    for path in (
        plain,
        evil,
        resolve_checkpoint(str(plain)),
        resolve_checkpoint("evil", search_dirs=[shipped]),
    ):
        for read in (load_checkpoint, read_checkpoint_meta):
            with pytest.raises(CheckpointError, match=r"is a pickle/torch\.save file") as exc:
                read(path)
            assert "cannot run code" in str(exc.value)
            _assert_one_line_naming(exc, path)
    assert not marker.exists()

    # Control: the payload is live, so the check above is meaningful.
    if kind == "pickle":
        pickle.loads(plain.read_bytes())
        assert marker.exists()


# ------------------------------------------------------------------------- name resolution


def test_resolve_paths_and_run_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "runs" / "x"
    last = save_checkpoint(run / "last", {}, {})
    assert resolve_checkpoint(str(run)) == last  # no best yet
    best = save_checkpoint(run / "best", {}, {})
    assert resolve_checkpoint(str(run)) == best
    assert resolve_checkpoint(str(run / "best")) == best
    assert resolve_checkpoint(str(last)) == last
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("runs/x/last") == Path("runs/x/last.safetensors")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="neither best"):
        resolve_checkpoint("empty_run")


def test_resolve_shipped_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = tmp_path / "shipped"
    ref = save_checkpoint(shipped / "my-omniglot", {}, {"preset": "omniglot-5w1s"})
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("my-omniglot", search_dirs=[shipped]) == ref
    assert resolve_checkpoint("my-omniglot.safetensors", search_dirs=[shipped]) == ref
    assert "my-omniglot" in list_pretrained(search_dirs=[shipped])
    assert "my-omniglot" not in list_pretrained()
    # A folder of that name in the working directory (say, a compare's --out) hides the shipped
    # name: the error says so and gives the shipped file.
    (tmp_path / "my-omniglot").mkdir()
    with pytest.raises(CheckpointError, match=f"hides the shipped checkpoint.*{ref}"):
        resolve_checkpoint("my-omniglot", search_dirs=[shipped])
    with pytest.raises(CheckpointError, match=r"shipped checkpoints: .*my-omniglot") as exc:
        resolve_checkpoint("omniglot-99w1s", search_dirs=[shipped])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "name",
    ["../secret", "..", "", " ", "a/../../secret", "/nonexistent/dir/secret", "..\\secret",
     "shipped/../../secret", ".hidden", "-rf", "a..b", "sub/secret", "nul\0byte", "~/secret"],
)  # fmt: skip
def test_shipped_names_cannot_escape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    save_checkpoint(tmp_path / "secret", {}, {})  # what an escape would reach
    shipped = tmp_path / "a" / "b" / "shipped"
    save_checkpoint(shipped / "sub" / "secret", {}, {})
    cwd = tmp_path / "a" / "b" / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(CheckpointError) as exc:
        resolve_checkpoint(name, search_dirs=[shipped])
    assert "\n" not in str(exc.value)


def test_shipped_symlink_out_of_folder_is_refused(tmp_path: Path) -> None:
    outside = save_checkpoint(tmp_path / "outside", {}, {})
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    try:
        (shipped / "link.safetensors").symlink_to(outside)
    except OSError:
        pytest.skip("symlinks unavailable")
    with pytest.raises(CheckpointError, match="points outside"):
        resolve_checkpoint("link", search_dirs=[shipped])


# ---------------------------------------------------------------------------- properties


_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_settings
@given(
    data=st.one_of(
        st.binary(max_size=300),
        # A plausible length prefix and a JSON-looking header get past the first checks.
        st.builds(
            lambda n, body: n.to_bytes(8, "little") + b"{" + body,
            st.integers(0, 400),
            st.binary(max_size=400),
        ),
        st.builds(
            lambda body: len(body).to_bytes(8, "little") + body,
            st.from_regex(rb'\{"__metadata__":\{.*\}.*\}', fullmatch=True),
        ),
    )
)
def test_random_bytes_always_give_checkpoint_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    for read in (load_checkpoint, read_checkpoint_meta):
        with pytest.raises(CheckpointError):
            read(path)


@_settings
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 10**6),
)
def test_damaged_checkpoint_errors_or_loads_unchanged(
    tmp_path: Path, flips: list[tuple[int, int]], cut: int | None
) -> None:
    path = tmp_path / "damaged.safetensors"
    original = save_checkpoint(path, _tensors(), META).read_bytes()
    data = bytearray(original)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    if cut is not None:
        data = data[: cut % len(data)]
    path.write_bytes(bytes(data))
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:  # only harmless changes (e.g. header padding) may load, and then unchanged
        _assert_same(tensors, _tensors())
        assert meta == META
