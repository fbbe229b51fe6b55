"""Keep freed memory in the process, so that each episode's tensors stop costing page faults.

glibc's ``malloc`` serves large blocks (above a threshold that grows with use to at most
32 MiB) with fresh ``mmap`` pages and returns them on ``free``, and it trims the free top of its
heap back to the system. An episode allocates and frees the same large activations again and
again ([300, 64, 28, 28] floats are 60 MB), so every episode's tensors arrive as new pages that
the kernel zero-fills on first touch. Meta-training the ``omniglot-5w1s`` recipe spent 30 % of
its CPU time in the kernel that way (1002 s of system time beside 2398 s of user time, 7e8 minor
page faults, over 4000 episodes on one thread of the AVX-512 Xeon).

:func:`keep_freed_memory` switches both off (``mallopt``: no ``mmap`` for blocks, no trimming),
so freed blocks are reused: the process keeps its peak footprint (what the episodes need
anyway) instead of returning and refetching it. The command line calls it at start; a program
using the Python API may call it once. It changes no result, only where memory comes from.

The price: every block now comes from one heap, so a small allocation that outlives an episode,
made while the episode's large blocks are free, splits one of them, and the next episode's large
block no longer fits there: the heap grows by a block per episode. Keep per-episode records as
Python objects or running digests, not tensors (``compare``'s record of 600 20-way test episodes
held their ids as tensors and grew to 10 GB; ``tests/test_allocator.py`` pins the fix).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_AT = 2**31 - 1  # bytes of free heap top before trimming (mallopt takes an int): 2 GiB

#: Environment variables through which a user sets glibc's malloc themselves; when one is set,
#: :func:`keep_freed_memory` leaves the allocator as the user configured it.
USER_SETTINGS = (
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "LD_PRELOAD",
)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (see the module's docstring).

    Returns whether the setting was applied: not on other C libraries (macOS, Windows, musl),
    and not when the environment already configures the allocator (:data:`USER_SETTINGS`, which
    includes ``LD_PRELOAD`` of jemalloc or tcmalloc).

    Example::

        import metalstm.allocator
        metalstm.allocator.keep_freed_memory()   # once, before meta-training on the CPU
    """
    if platform.libc_ver()[0] != "glibc" or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_AT))
