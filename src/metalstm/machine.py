"""The machine a time was measured on, in words: every reported time names it, since machines of
one kind differ several-fold (``metalstm bench``, ``train``, ``compare`` and the benchmarks)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name, family and model, and widest vector ISA (Linux ``/proc/cpuinfo``),
    or the platform's processor string."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine() or "unknown CPU"
    name = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = fields.get("flags", "").split()
    return name + (", AVX-512" if "avx512f" in flags else ", AVX2" if "avx2" in flags else "")


def describe(device: torch.device) -> str:
    """Where work on ``device`` runs, in words: the CPU and PyTorch's thread count, and the GPU's
    name on CUDA, e.g. ``Intel(R) Xeon(R) Processor (family 6, model 207), AVX-512; 1 thread``."""
    threads = torch.get_num_threads()
    where = f"{cpu_name()}; {threads} thread{'s' if threads != 1 else ''}"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA), {where}"
    return where
