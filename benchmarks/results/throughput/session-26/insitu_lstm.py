"""The meta-learner's step timed in situ: ``MetaLearnerCell.forward`` against the native step
library's calls, inside ``metalstm bench`` on 28x28 gray 5-way 1-shot episodes (T = 12) in
batches of 8. Run from the repository root::

    .venv/bin/python benchmarks/results/throughput/session-26/insitu_lstm.py

Prints the bench's own figures, then milliseconds per episode of each timed function (the bench
runs its warm-up and timed episodes, 56, twice: a first pass and the timed one).
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from typing import Any

import metalstm.inner_loop as inner_loop
import metalstm.methods.metalearner.cell as cell
import metalstm.methods.metalearner.native as native
from metalstm.cli import main

EPISODES = 2 * (48 + 8)
seconds: dict[str, float] = collections.defaultdict(float)
calls: dict[str, int] = collections.defaultdict(int)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[name] += time.perf_counter() - start
        calls[name] += 1
        return result

    return wrapper


class Library:
    """The step library with its entry points timed."""

    def __init__(self, library: Any) -> None:
        self.library = library

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.library, name)
        return timed(f"library.{name}", attribute) if name.startswith("metalstm") else attribute


library = Library(native.library())
native.library = lambda: library  # type: ignore[assignment,return-value]
forward = cell.MetaLearnerCell.forward
cell.MetaLearnerCell.forward = timed("MetaLearnerCell.forward", forward)  # type: ignore[method-assign]
inner_loop.learner_loss_and_grad = timed("learner_loss_and_grad", inner_loop.learner_loss_and_grad)
SHAPE = ["--image-size", "28", "--channels", "1", "--shots", "1", "--no-compile"]
main(
    [
        "bench",
        *SHAPE,
        "--episodes",
        "48",
        "--warmup",
        "8",
        "--meta-batch",
        "8",
        "--episode-batch",
        "8",
    ]
)
for name, total in seconds.items():
    print(f"{name}: {1e3 * total / EPISODES:.2f} ms per episode ({calls[name]} calls)")
sys.exit(0)
