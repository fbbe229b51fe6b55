"""Live progress lines on stderr, one helper for training, evaluation and ``metalstm compare``.

How often a line is written depends on where it goes:

* **a terminal**: one line, rewritten in place (carriage return, erase to the end of the line), at
  most every :data:`TTY_SECONDS`, cut to the terminal's width so it never wraps;
* **anything else** (a pipe, a file, a CI log): each update is a new line, written only when both
  ``every_fraction`` of the work and ``every_seconds`` have passed since the last one (whichever
  is rarer), and always at the end. The default, a quarter of the work and 30 s, gives at most
  five lines per job, and a job shorter than 30 s writes only its last line.

A surrounding job can put its own status in front of every line written inside a block
(:func:`surrounding`); ``metalstm compare`` says there which method runs and how long the whole
comparison still needs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TextIO

TTY_SECONDS = 0.5  # at most this often on a terminal
MIN_WIDTH = 20  # a terminal reporting fewer columns (0: a pseudo-terminal of unset size) is not cut


class LiveLine:
    """A progress line for ``total`` units of work, from ``start`` (a resumed job) to ``total``.

    :meth:`update` with the units done and a function giving the text; the text is only computed
    when a line is due. ``out=None`` writes nothing.
    """

    def __init__(
        self,
        out: TextIO | None,
        total: int,
        *,
        start: int = 0,
        every_fraction: float = 0.25,
        every_seconds: float = 30.0,
    ) -> None:
        self.out, self.total, self.start, self.done = out, total, start, start
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.tty = bool(out is not None and out.isatty())
        self.t0 = time.perf_counter()
        self.last_time = -math.inf if self.tty else self.t0  # a terminal sees the first update
        self.last_done = start
        self.shown = False
        context = _context.get()
        self.prefix = context.prefix if context is not None else None
        if context is not None and context.main is None:
            context.main = self

    def update(self, done: int, text: Callable[[], str]) -> None:
        """``done`` units are done; write ``text()`` if a line is due."""
        self.done = done
        if self.out is None:
            return
        now = time.perf_counter()
        if not self._due(done, now):
            return
        self.last_time, self.last_done, self.shown = now, done, True
        line = (self.prefix() if self.prefix is not None else "") + text()
        if self.tty:
            width = terminal_width(self.out)
            if width is not None and len(line) >= width:
                line = line[: width - 2] + "…"
            print("\r" + line + "\033[K", end="", file=self.out, flush=True)
        else:
            print(line, file=self.out, flush=True)

    def _due(self, done: int, now: float) -> bool:
        if done >= self.total:
            return True
        if self.tty:
            return now - self.last_time >= TTY_SECONDS
        enough_work = done - self.last_done >= self.every_fraction * self.total
        return enough_work and now - self.last_time >= self.every_seconds

    def rate(self) -> float:
        """Units per second done by this process so far."""
        return (self.done - self.start) / max(time.perf_counter() - self.t0, 1e-9)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> float:
        """Seconds left at the current rate (inf before the first unit)."""
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else math.inf

    def timing(self) -> str:
        """``ETA 1m12s`` while running, ``done in 3m07s`` once all the work is done."""
        if self.done >= self.total:
            return f"done in {format_seconds(self.elapsed())}"
        return f"ETA {format_seconds(self.eta())}"

    def close(self) -> None:
        """End the line on a terminal, so that what follows starts on a fresh one."""
        if self.out is not None and self.tty and self.shown:
            print(file=self.out, flush=True)


def terminal_width(out: TextIO) -> int | None:
    """Columns of the terminal behind ``out`` (None when it has no real one, or reports none)."""
    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None
    return columns if columns >= MIN_WIDTH else None


def format_seconds(seconds: float) -> str:
    """``1h05m``, ``3m07s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Surrounding:
    """The status of a surrounding job, in front of every line opened in its block.

    ``main`` is the first line opened in the block: a training run's own line, not the lines of the
    validations it runs meanwhile.
    """

    prefix: Callable[[], str]
    main: LiveLine | None = None


_context: ContextVar[Surrounding | None] = ContextVar("metalstm_progress", default=None)


@contextmanager
def surrounding(prefix: str | Callable[[], str]) -> Iterator[Surrounding]:
    """Inside the block, every progress line starts with ``prefix`` (or ``prefix()``, computed
    for each line)."""
    block = Surrounding(prefix if callable(prefix) else lambda: prefix)
    token = _context.set(block)
    try:
        yield block
    finally:
        _context.reset(token)
