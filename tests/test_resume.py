"""Exact resume: a run killed (SIGKILL) or interrupted (SIGINT, SIGTERM) and resumed ends with
the same meta-parameters, metrics and checkpoints as a run never interrupted.

The signal is sent by the training process itself right after a given meta-update (a wrapper
around ``Trainer.update`` in a small driver script), so the test interrupts the run at the same
point on a fast machine and a slow one: timing never decides whether it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tensorboard_scalars
from metalstm.checkpoint import load_checkpoint, save_checkpoint
from metalstm.machine import cpu_name
from metalstm.training import UNRECORDED, catch_sigint

TINY = [
    "--preset", "omniglot-5w1s-paper", "--episodes", "64", "--quiet",
    "--set", "filters=4", "--set", "inner_steps=2", "--set", "val_interval=4",
    "--set", "val_episodes=3", "--set", "log_interval=2", "--set", "q_query=5",
]  # fmt: skip


#: Runs ``metalstm.cli.main`` with ``sys.argv[3:]``, sending signal ``argv[2]`` to itself right
#: after meta-update ``argv[1]`` (1-based): an interruption at a fixed point of the run.
SIGNAL_AFTER_UPDATE = """
import os, sys
from metalstm import cli, training
after, signum = int(sys.argv[1]), int(sys.argv[2])
update = training.Trainer.update
def update_then_signal(trainer, step):
    out = update(trainer, step)
    if step + 1 == after:
        os.kill(os.getpid(), signum)
    return out
training.Trainer.update = update_then_signal
sys.exit(cli.main(sys.argv[3:]))
"""


def metalstm(
    *args: str, env: dict[str, str], signal_after: tuple[int, int] | None = None
) -> subprocess.Popen[str]:
    """``metalstm ARGS`` in a subprocess; with ``signal_after=(update, signal)`` it signals itself
    right after that meta-update."""
    command = [sys.executable, "-m", "metalstm", *args]
    if signal_after is not None:
        after, sig = signal_after
        command = [sys.executable, "-c", SIGNAL_AFTER_UPDATE, str(after), str(int(sig)), *args]
    return subprocess.Popen(
        command,
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "after"),
    [
        (signal.SIGKILL, 10),  # between checkpoints (the last one at update 8)
        (signal.SIGKILL, 13),  # in the update right after a validation checkpoint
        (signal.SIGINT, 21),  # finishes the update, checkpoints, exits 130
        (signal.SIGTERM, 18),  # like Ctrl-C
    ],
)
def test_killed_run_resumes_bit_for_bit(
    reference_run: tuple[Path, dict], tmp_path: Path, sig: signal.Signals, after: int
) -> None:
    reference, env = reference_run
    run = tmp_path / "run"
    process = metalstm("train", "--out", str(run), *TINY, env=env, signal_after=(after, sig))
    assert finish(process) == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    _, meta = load_checkpoint(run / "last.safetensors")
    # SIGINT and SIGTERM stop after the update they arrive in; a killed run keeps the last
    # checkpoint before it (one per validation, every 4 updates here)
    expected = (after - 1) // 4 * 4 if sig == signal.SIGKILL else after
    assert meta["train_state"]["step"] == expected
    resumed = metalstm("train", "--resume", str(run), "--quiet", env=env)
    assert finish(resumed) == 0
    assert_same_run(reference, run)


@pytest.mark.slow
@pytest.mark.parametrize("recorded", [True, False])
def test_a_resumed_run_adds_its_cpu_time_and_machine_to_the_checkpoints(
    reference_run: tuple[Path, dict], tmp_path: Path, recorded: bool
) -> None:
    """Training's CPU time and machines go on from the checkpoint's; resumed from a checkpoint
    that predates them (``recorded=False``), the machines start with ``UNRECORDED``."""
    _, env = reference_run
    run = tmp_path / "run"
    process = metalstm(
        "train", "--out", str(run), *TINY, env=env, signal_after=(10, signal.SIGKILL)
    )
    assert finish(process) == -signal.SIGKILL
    last = run / "last.safetensors"
    tensors, meta = load_checkpoint(last)
    state = meta["train_state"]
    assert state["step"] == 8 and state["cpu_seconds"] > 0 and len(state["machines"]) == 1
    here = state["machines"][0]
    assert here.startswith(cpu_name())
    if recorded:
        state["cpu_seconds"] = 1000.0  # as if the first process had run for that long
    else:
        del state["cpu_seconds"], state["machines"]
    save_checkpoint(last, tensors, meta)
    assert finish(metalstm("train", "--resume", str(run), "--quiet", env=env)) == 0
    state = load_checkpoint(last)[1]["train_state"]
    assert state["step"] == 64
    if recorded:
        assert state["cpu_seconds"] > 1000.0 and state["machines"] == [here]
    else:
        assert 0.0 < state["cpu_seconds"] < 1000.0 and state["machines"] == [UNRECORDED, here]


@pytest.mark.slow
def test_resume_falls_back_to_previous_checkpoint(
    reference_run: tuple[Path, dict], tmp_path: Path
) -> None:
    reference, env = reference_run
    run = tmp_path / "run"
    # killed after update 9: last holds update 8, last.prev update 4
    process = metalstm("train", "--out", str(run), *TINY, env=env, signal_after=(9, signal.SIGKILL))
    assert finish(process) == -signal.SIGKILL
    last = run / "last.safetensors"
    data = bytearray(last.read_bytes())  # checkpoints are renamed into place: never partial
    data[-5] ^= 0xFF  # a flipped bit in the newest checkpoint
    last.write_bytes(bytes(data))
    resumed = metalstm("train", "--resume", str(run), "--quiet", env=env)
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    print(err)
    assert_same_run(reference, run)
    assert "checksum" in err or "corrupted" in err


def test_a_second_interrupt_stops_at_once() -> None:
    """The first Ctrl-C asks the run to stop after its update; a second one, while e.g. a long
    validation round holds that update back, stops it at once (Python's own KeyboardInterrupt)."""
    said: list[str] = []
    trainer = SimpleNamespace(_interrupted=False, say=said.append)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with catch_sigint(trainer):  # type: ignore[arg-type]
            signal.raise_signal(signal.SIGINT)
            assert trainer._interrupted and "again: stop now" in said[0]
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
