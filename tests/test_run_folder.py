"""Run folders that careless or hostile input cannot hurt: one process at a time (lock), a
resume that refuses an edited config or a shortened run, --force that clears only a run's own
files, nothing written before everything is validated, and a best checkpoint never lost."""

from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from metalstm.checkpoint import load_checkpoint
from metalstm.cli import main
from metalstm.config import Config, override
from metalstm.runfolder import LOCK, hold
from metalstm.training import Trainer

TINY = [
    "--preset", "omniglot-5w1s-paper", "--episodes", "8", "--quiet",
    "--set", "filters=4", "--set", "inner_steps=2", "--set", "val_interval=4",
    "--set", "val_episodes=2", "--set", "log_interval=2", "--set", "q_query=2",
]  # fmt: skip


def run_cli(*argv: str | Path) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("metalstm: error: "), err
    for word in words:
        assert word in err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    saved = {key: os.environ.get(key) for key in ("METALSTM_DATA", "METALSTM_CACHE")}
    os.environ.update({"METALSTM_DATA": str(data_root), "METALSTM_CACHE": str(cache)})
    run = tmp_path_factory.mktemp("runs") / "finished"
    try:
        code, err = run_cli("train", "--out", run, *TINY)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    assert code == 0, err
    return run


@pytest.fixture
def run(finished_run: Path, tmp_path: Path, data_env: Path) -> Path:
    """A copy of a finished 8-episode run, to resume, edit or break."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# -- the lock -----------------------------------------------------------------------------------
def test_a_second_process_is_refused_while_the_run_holds_the_folder(run: Path) -> None:
    before = snapshot(run)
    with hold(run):
        for argv in (["--resume", run, "--episodes", "12"], ["--out", run, "--force", *TINY]):
            code, err = run_cli("train", *argv)
            assert_refused(code, err, "in use by metalstm process", str(os.getpid()))
    assert snapshot(run) == before
    assert not (run / LOCK).exists()  # released with the run


def test_a_stale_lock_of_a_dead_process_is_taken_over(run: Path) -> None:
    (run / LOCK).write_text("999999\n")  # a crashed owner: its flock died with it
    code, err = run_cli("train", "--resume", run, "--episodes", "12", "--quiet")
    assert code == 0, err
    assert load_checkpoint(run / "last.safetensors")[1]["train_state"]["step"] == 12
    assert not (run / LOCK).exists()


# -- resume trusts nothing it did not write ------------------------------------------------------
def test_an_edited_config_is_refused_and_nothing_changes(run: Path) -> None:
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("k_shot: 1", "k_shot: 5"))
    before = snapshot(run)
    code, err = run_cli("train", "--resume", run, "--episodes", "12")
    assert_refused(code, err, "disagrees", "k_shot=5 (checkpoint: 1)")
    assert snapshot(run) == before


def test_episodes_below_what_was_done_are_refused_an_extension_is_kept(run: Path) -> None:
    before = snapshot(run)
    code, err = run_cli("train", "--resume", run, "--episodes", "5")
    assert_refused(code, err, "fewer than the 8 episodes")
    assert snapshot(run) == before
    code, err = run_cli("train", "--resume", run, "--episodes", "12", "--quiet")
    assert code == 0, err
    assert "episodes: 12" in (run / "config.yaml").read_text()


def test_a_folder_left_with_only_best_is_never_started_over(run: Path) -> None:
    for name in ("last.safetensors", "last.prev.safetensors"):
        (run / name).unlink()
    before = snapshot(run)
    code, err = run_cli("train", "--resume", run)
    assert_refused(code, err, "best.safetensors", "no last.safetensors")
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "content",
    [b"\x00\xff\xfe binary", b"[1, 2", b"!!python/object/apply:os.system ['true']", b"- 1\n- 2\n"],
)
def test_a_garbage_config_yaml_is_one_line(run: Path, content: bytes) -> None:
    (run / "config.yaml").write_bytes(content)
    code, err = run_cli("train", "--resume", run)
    assert_refused(code, err, "config.yaml")


def test_malformed_metric_lines_are_dropped_not_fatal(run: Path) -> None:
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b'5\n{"note": "x"}\n{"step": "abc"}\n\x00\xff binary\n')
    code, err = run_cli("train", "--resume", run, "--episodes", "12", "--quiet")
    assert code == 0, err
    code, err = run_cli("plot", "curves", "--run", run, "--out", run.parent / "curves.png")
    assert code == 0, err
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    code, err = run_cli("train", "--resume", run, "--episodes", "16")
    assert_refused(code, err, "metrics.jsonl")


# -- --force and new runs ---------------------------------------------------------------------
def test_force_never_clears_a_folder_that_is_not_a_run(tmp_path: Path, data_env: Path) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    (folder / "config.yaml").write_text("title: my thesis\n")
    code, err = run_cli("train", "--out", folder, "--force", *TINY)
    assert_refused(code, err, "not a metalstm run")
    assert snapshot(folder) == {"config.yaml": b"title: my thesis\n", "thesis.tex": b"precious"}


def test_force_clears_only_the_runs_own_files(run: Path) -> None:
    (run / "notes.txt").write_text("mine")
    code, err = run_cli("train", "--out", run, "--force", *TINY)
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine"


def test_a_refused_start_writes_nothing_and_the_fix_then_runs(
    tmp_path: Path, data_env: Path
) -> None:
    out = tmp_path / "new"
    code, err = run_cli("train", "--out", out, *TINY, "--set", "n_way=1000")  # > val classes
    assert_refused(code, err, "n_way=1000")
    assert not out.exists()
    code, err = run_cli("train", "--out", out, *TINY)
    assert code == 0, err


def test_a_full_disk_leaves_no_half_made_folder(
    tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "new"
    code, err = run_cli("train", "--out", out, *TINY)
    assert_refused(code, err, "No space left on device")
    assert not out.exists()


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_an_impossible_out_is_one_line(tmp_path: Path, data_env: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run" if where == "under a file" else tmp_path / "file"
    code, err = run_cli("train", "--out", out, *TINY)
    assert_refused(code, err, str(out))
    assert (tmp_path / "file").read_text() == "x"


def test_control_characters_in_the_folder_name_are_escaped_on_the_success_line(
    tmp_path: Path, data_env: Path
) -> None:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(["train", "--out", str(tmp_path / "a\rb\x1b[2J"), *TINY]) == 0
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()
    assert "\x1b" not in out.getvalue() and "a\\rb\\x1b[2J" in out.getvalue()


# -- a diverged model is never the best --------------------------------------------------------
def test_non_finite_weights_are_never_saved_as_best_nor_loaded(
    tmp_path: Path, data_env: Path
) -> None:
    values = {"filters": 4, "inner_steps": 2, "val_episodes": 2, "q_query": 2, "episodes": 4}
    trainer = Trainer(override(Config(), values), tmp_path, log=None)
    with torch.no_grad():
        next(trainer.method.parameters()).fill_(float("nan"))
    trainer.validation_round()
    assert not (tmp_path / "best.safetensors").exists()
    assert trainer.state.best_accuracy == -1.0
    code, err = run_cli("evaluate", "--checkpoint", tmp_path / "last.safetensors")
    assert_refused(code, err, "non-finite")


def test_non_finite_settings_are_refused(tmp_path: Path) -> None:
    for setting in ("lr=inf", "lr=nan", "clip_grad_norm=inf", "maml_inner_lr=-inf"):
        code, err = run_cli("train", "--out", tmp_path / "x", *TINY, "--set", setting)
        assert_refused(code, err, setting.split("=")[0])
    assert not (tmp_path / "x").exists()
