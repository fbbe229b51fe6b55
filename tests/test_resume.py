"""Exact resume: a run killed (SIGKILL) or interrupted (SIGINT, SIGTERM) at a random moment and
resumed ends with the same meta-parameters, metrics and checkpoints as a run never interrupted."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tensorboard_scalars
from metalstm.checkpoint import load_checkpoint

TINY = [
    "--preset", "omniglot-5w1s", "--episodes", "64", "--quiet",
    "--set", "filters=4", "--set", "inner_steps=2", "--set", "val_interval=4",
    "--set", "val_episodes=3", "--set", "log_interval=2", "--set", "q_query=5",
]  # fmt: skip


def metalstm(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "metalstm", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> int:
    _out, err = process.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return process.returncode


def metric_rows(run: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("last", "best"):
        ta, ma = load_checkpoint(a / f"{name}.safetensors")
        tb, mb = load_checkpoint(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs"
        sa, sb = ma["train_state"], mb["train_state"]
        for field in ("step", "best_accuracy", "best_step", "validations", "nonfinite_total"):
            assert sa[field] == sb[field], field
    assert metric_rows(a) == metric_rows(b)
    # events written after the last checkpoint by the killed process are purged on resume
    assert tensorboard_scalars(a) == tensorboard_scalars(b)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, dict]:
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "METALSTM_DATA": str(data_root), "METALSTM_CACHE": str(cache)}
    run = tmp_path_factory.mktemp("runs") / "reference"
    assert finish(metalstm("train", "--out", str(run), *TINY, env=env)) == 0
    return run, env


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_run_resumes_bit_for_bit(
    reference_run: tuple[Path, dict], tmp_path: Path, sig: signal.Signals
) -> None:
    reference, env = reference_run
    run = tmp_path / "run"
    process = metalstm("train", "--out", str(run), *TINY, env=env)
    wait_for(run / "last.safetensors", process)
    time.sleep(random.uniform(0.0, 1.5))  # a random moment after the first checkpoint
    process.send_signal(sig)
    code = finish(process)
    if code == 0:
        pytest.skip("the run finished before the signal arrived")
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)  # SIGTERM: like Ctrl-C
    resumed = metalstm("train", "--resume", str(run), "--quiet", env=env)
    assert finish(resumed) == 0
    assert_same_run(reference, run)


@pytest.mark.slow
def test_resume_falls_back_to_previous_checkpoint(
    reference_run: tuple[Path, dict], tmp_path: Path
) -> None:
    reference, env = reference_run
    run = tmp_path / "run"
    process = metalstm("train", "--out", str(run), *TINY, env=env)
    last, prev = run / "last.safetensors", run / "last.prev.safetensors"
    wait_for(prev, process)
    wait_for(last, process)  # a rotation renames last to last.prev, then writes a new last
    process.send_signal(signal.SIGKILL)
    finish(process)
    if not last.exists():  # killed inside a rotation (rare): last.prev is then the newest
        shutil.copyfile(prev, last)
    data = bytearray(last.read_bytes())  # checkpoints are renamed into place: never partial
    data[-5] ^= 0xFF  # a flipped bit in the newest checkpoint
    last.write_bytes(bytes(data))
    resumed = metalstm("train", "--resume", str(run), "--quiet", env=env)
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    print(err)
    assert_same_run(reference, run)
    assert "checksum" in err or "corrupted" in err
