"""Data parallelism: two gloo processes with a global meta-batch of 4 end with the same
meta-parameters as one process with a meta-batch of 4 on the same episodes, bit for bit, and so
does a run started on one process and resumed on two.

Bit for bit, not within a tolerance: every process runs one thread, computes each of its
episodes exactly as one process would, and the episodes' gradients are summed in slot order on
every rank (Distributed.sum_gradients), so nothing is left to rounding order. (A tolerance would
not do: the learner's ReLU and max-pool kinks turn a 1e-7 difference into 1e-3 within a few
updates.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalstm.checkpoint import load_checkpoint

TINY = [
    "--preset", "omniglot-5w1s-paper", "--episodes", "16", "--quiet",
    "--set", "filters=4", "--set", "inner_steps=2", "--set", "val_interval=8",
    "--set", "val_episodes=4", "--set", "log_interval=4", "--set", "q_query=5",
    "--set", "meta_batch=4", "--set", "lr=0.001", "--set", "lr_schedule=constant",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_run(single: Path, other: Path) -> None:
    """Same meta-parameters, optimizer state and validation history, bit for bit."""
    a, meta_a = load_checkpoint(single / "last.safetensors")
    b, meta_b = load_checkpoint(other / "last.safetensors")
    assert meta_a["train_state"]["step"] == meta_b["train_state"]["step"] == 4
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Validation episodes are sharded across ranks and gathered: the same accuracies.
    assert meta_a["train_state"]["validations"] == meta_b["train_state"]["validations"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(
    data_root: Path, session_cache: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "METALSTM_DATA": str(data_root),
        "METALSTM_CACHE": str(session_cache),
        "OMP_NUM_THREADS": "1",
    }
    train = [sys.executable, "-m", "metalstm", "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    single, double, resumed = tmp_path / "single", tmp_path / "double", tmp_path / "resumed"
    run([*train, "--out", str(single), *TINY], env)
    run([*torchrun, "-m", "metalstm", "train", "--out", str(double), *TINY], env)
    assert_same_run(single, double)

    # Half the run on one process, the rest on two: the global meta-batch fixes the episodes.
    run([*train, "--out", str(resumed), *TINY, "--episodes", "8"], env)
    torchrun[-1] = str(free_port())
    run([*torchrun, "-m", "metalstm", "train", "--resume", str(resumed), "--episodes", "16"], env)
    assert_same_run(single, resumed)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_batches_of_episodes(
    data_root: Path, session_cache: Path, tmp_path: Path
) -> None:
    """With ``episode_batch`` 2 each rank's share of the meta-batch (2 episodes) is one batched
    item, and validation's episodes go in blocks of 2 to the ranks: the same bits as one process,
    whose items are the same pairs."""
    env = {
        **os.environ,
        "METALSTM_DATA": str(data_root),
        "METALSTM_CACHE": str(session_cache),
        "OMP_NUM_THREADS": "1",
    }
    tiny = [*TINY, "--set", "episode_batch=2", "--set", "filters=8"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    single, double = tmp_path / "single", tmp_path / "double"
    run([sys.executable, "-m", "metalstm", "train", "--out", str(single), *tiny], env)
    run([*torchrun, "-m", "metalstm", "train", "--out", str(double), *tiny], env)
    assert_same_run(single, double)


LEAVE_GROUP = """
import os, sys, torch
from metalstm.distributed import Distributed
group = Distributed.from_environment(torch.device("cpu"))
group.check_same_config("{}")
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # as a Trainer does, after joining
group.close()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
sys.exit(f"threads still running: {names}" if any("gloo" in n for n in names) else 0)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_leaving_the_group_stops_gloo_threads(tmp_path: Path) -> None:
    """Distributed.close frees the process group: no gloo thread is left to outlive it into
    interpreter teardown, where one aborted a rank's exit now and then (SIGABRT after a finished
    run)."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_GROUP)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    run([*torchrun, str(script)], {**os.environ, "OMP_NUM_THREADS": "1"})
