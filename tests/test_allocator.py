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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run(
            [sys.executable, "-c", COUNT_FAULTS, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        faults[mode] = int(result.stdout.split()[-1])
    pages = 20 * 2**26 // 4096  # every 4 KiB page of every allocation
    if faults["default"] < pages / 2:
        pytest.skip("this kernel backs these blocks with huge pages: few faults to save")
    assert faults["keep"] < faults["default"] / 2


def test_an_allocator_the_user_configured_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=8")
    assert keep_freed_memory() is False
