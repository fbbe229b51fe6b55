"""keep_freed_memory: freed tensors' memory is reused instead of refetched as new pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from metalstm.allocator import USER_SETTINGS, keep_freed_memory

# Minor page faults of 20 allocations of a 64 MB tensor, each written then freed; argv[1]
# "keep" calls keep_freed_memory first.
COUNT_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from metalstm.allocator import keep_freed_memory
    assert keep_freed_memory()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(2**24)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""

# Growth of resident memory (MB) over 150 episodes recorded by compare's sampler, each followed by
# an evaluation-sized temporary (32 MB) freed before the next: small long-lived allocations made
# between large freed blocks split them, and the heap grows by a block per episode.
RECORDED_EPISODES_GROWTH = """
import torch
from metalstm.allocator import keep_freed_memory
from metalstm.compare.evaluation import RecordingSampler
from metalstm.data import ClassImages

assert keep_freed_memory()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
images = torch.randint(0, 256, (40 * 20, 1, 28, 28), dtype=torch.uint8)
data = ClassImages.from_counts(images, [20] * 40, [str(c) for c in range(40)])
sampler = RecordingSampler(data, 20, 1, 15, seed=0)
def one(step):
    episode = sampler.episode(step)
    (torch.ones(320, 32, 28, 28) * episode.query_x.mean()).sum()
for step in range(20):
    one(step)
start = resident_mb()
for step in range(20, 170):
    one(step)
print(resident_mb() - start)
"""


def run_script(script: str, *args: str) -> str:
    """stdout of ``script`` run in a fresh interpreter, with glibc's malloc as shipped."""
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return result.stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    faults = {mode: int(run_script(COUNT_FAULTS, mode).split()[-1]) for mode in ("default", "keep")}
    pages = 20 * 2**26 // 4096  # every 4 KiB page of every allocation
    if faults["default"] < pages / 2:
        pytest.skip("this kernel backs these blocks with huge pages: few faults to save")
    assert faults["keep"] < faults["default"] / 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_recording_a_long_evaluation_keeps_memory_flat() -> None:
    # Storing each served episode's ids as tensors grew this by 9 GB (about 60 MB per episode).
    assert float(run_script(RECORDED_EPISODES_GROWTH).split()[-1]) < 100


def test_an_allocator_the_user_configured_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=8")
    assert keep_freed_memory() is False
