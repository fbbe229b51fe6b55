"""Two builds of the native step kernels, alternating in one process: the first-order chain
backward of 12 steps from the initial state (h_0 = c_0 = 0), as an episode runs it.

Usage: python chain_ab.py OLD.so NEW.so [COORDINATES] [CALLS] (the ``native_step-*.so`` files
that ``metalstm.native`` builds into ``~/.cache/metalstm/native``). Prints ms per call of each
build (median, first quartile, minimum) and whether their results have the same bits.
"""

from __future__ import annotations

import ctypes
import sys
import time

import torch

from metalstm.methods.metalearner import kernels, native

HIDDEN, STEPS = 20, 12


def load(path: str) -> ctypes.CDLL:
    """A build of the step kernels with the argument types of the library's own handle."""
    lib, real = ctypes.CDLL(path), native.library()
    for name in ("metalstm_chain_backward", "metalstm_step_forward"):
        getattr(lib, name).argtypes = getattr(real, name).argtypes
        getattr(lib, name).restype = getattr(real, name).restype
    return lib


def episode_steps(n: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """What STEPS forward steps from the initial state save for the chain backward."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    features, grad = rand(2, n), rand(n, scale=0.01)
    weight, bias = rand(4 * HIDDEN, 2 + HIDDEN, scale=0.3), rand(4 * HIDDEN, scale=0.3)
    gate_weight, gate_bias = rand(2, HIDDEN + 2, scale=0.3), torch.tensor([4.5, -4.5])
    theta, logits = rand(n, scale=0.1), torch.zeros(2, n)
    h, c = kernels.zero_state(theta, HIDDEN), kernels.zero_state(theta, HIDDEN)
    saved = []
    for _ in range(STEPS):
        out = native.step_forward(
            HIDDEN, features, h, c, theta, logits, grad, weight, bias, gate_weight, gate_bias
        )
        saved.append(tuple(out[5:]))
        theta, logits, h, c = out[:4]
    return tuple(saved)


def main() -> None:
    builds = {"old": load(sys.argv[1]), "new": load(sys.argv[2])}
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 228_000
    calls = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    steps = episode_steps(n)
    d_theta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in builds}
    results: dict[str, tuple[torch.Tensor, ...]] = {}
    for call in range(calls):
        order = list(builds) if call % 2 == 0 else list(builds)[::-1]
        for name in order:
            lib = builds[name]
            native.library = lambda lib=lib: lib  # type: ignore[misc]
            start = time.perf_counter()
            results[name] = native.chain_backward(HIDDEN, steps, d_theta)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        values.sort()
        median, quartile, least = (1e3 * values[k] for k in (len(values) // 2, len(values) // 4, 0))
        print(f"{name}: median {median:.1f} ms, first quartile {quartile:.1f}, min {least:.1f}")
    same = all(torch.equal(a, b) for a, b in zip(results["old"], results["new"]))
    print("same bits:", same)


if __name__ == "__main__":
    main()
