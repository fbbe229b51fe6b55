"""The one writer of the package (metalstm.files.write_file): atomic for regular files, never
replacing a device, FIFO or symlink, permissions from the umask, one-line errors; and every
command's outputs go through it."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from metalstm.checkpoint import save_checkpoint
from metalstm.config import Config
from metalstm.errors import OutputError
from metalstm.files import write_file
from metalstm.methods import build_method
from metalstm.serialization import method_tensors


def null_device(folder: Path) -> Path:
    """A character device like /dev/null (1, 3), made inside ``folder`` only."""
    path = folder / "mynull"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")
    return path


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def interrupted(handle: object) -> None:
        handle.write(b"new but incomplete")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file(target, interrupted)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]
    write_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["file.bin"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()  # readable by others, like any file


def test_disk_full_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device") as exc:
        write_file(tmp_path / "config.yaml", "a: 1\n")
    assert "\n" not in str(exc.value) and str(tmp_path / "config.yaml") in str(exc.value)
    assert os.listdir(tmp_path) == []


def test_a_device_is_written_through_never_replaced(tmp_path: Path) -> None:
    device = null_device(tmp_path)
    write_file(device, b"a PNG, say")
    assert stat.S_ISCHR(device.stat().st_mode)
    assert sorted(os.listdir(tmp_path)) == ["mynull"]


def test_a_symlink_stays_a_link_and_its_target_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "real.json").write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to("real.json")
    write_file(link, "new")
    assert link.is_symlink() and os.readlink(link) == "real.json"
    assert (tmp_path / "real.json").read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to("sub/made.json")
    write_file(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "sub" / "made.json").read_text() == "made"


def test_a_fifo_is_written_to_its_reader_or_refused_without_one(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="no process reads"):
        write_file(fifo, b"x")
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    while not received and reader.is_alive():
        try:
            write_file(fifo, b"through the pipe")
            break
        except OutputError:  # the reader has not opened its end yet
            continue
    reader.join(timeout=10)
    assert received == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)


@pytest.mark.parametrize("what", ["folder", "under a file", "read-only folder"])
def test_unwritable_targets_are_one_line_errors(tmp_path: Path, what: str) -> None:
    if what == "folder":
        target = tmp_path / "folder"
        target.mkdir()
        match = "it is a folder"
    elif what == "under a file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "out.png"
        match = "cannot write"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
        target = folder / "out.png"
        match = "Permission denied"
    with pytest.raises(OutputError, match=match) as exc:
        write_file(target, b"x")
    assert "\n" not in str(exc.value)


def test_checkpoints_follow_the_umask(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    config = Config.from_dict({"filters": 4, "inner_steps": 2})
    meta = {"algorithm": "lstm", "config": config.to_dict()}
    return save_checkpoint(tmp_path / "model", method_tensors(build_method(config)), meta)


@pytest.mark.parametrize("command", ["evaluate", "gates", "curves"])
def test_commands_write_through_a_device_file(
    command: str, checkpoint: Path, tmp_path: Path, data_env: Path
) -> None:
    device = null_device(tmp_path)
    argv = {
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint), "--episodes", "2"],
        "gates": ["plot", "gates", "--checkpoint", str(checkpoint), "--episodes", "1"],
        "curves": ["plot", "curves", "--run", str(tmp_path / "run")],
    }[command]
    if command == "curves":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_text(
            '{"step": 2, "loss": 1.0, "accuracy": 0.5}\n{"step": 2, "val_accuracy": 0.4}\n'
        )
    code, _, err = run_cli([*argv, "--out", str(device)])
    assert code == 0, err
    assert stat.S_ISCHR(device.stat().st_mode)


@pytest.mark.parametrize("command", ["evaluate", "gates", "curves", "bench"])
def test_output_naming_a_folder_is_refused_before_any_work(
    command: str, checkpoint: Path, tmp_path: Path
) -> None:
    argv = {
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint)],
        "gates": ["plot", "gates", "--checkpoint", str(checkpoint)],
        "curves": ["plot", "curves", "--run", str(tmp_path)],
        "bench": ["bench"],
    }[command]
    for out in (str(tmp_path), str(tmp_path / "new") + "/"):
        code, _, err = run_cli([*argv, "--out", out])
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "folder" in err
    assert not (tmp_path / "new").exists()
