"""Makes stored.cpp from 9111c71's native_step.cpp (the argument): the forward writes layer 1's
gate activations of every step to a buffer of its own (streaming stores) and the chain backward
reads them instead of computing them again, when ``g_on``. A measurement variant for
``stored_main.cpp``, not library code.

Usage: git show 9111c71:src/metalstm/methods/metalearner/native_step.cpp > base.cpp;
python make_stored.py base.cpp
"""

from __future__ import annotations

import sys
from pathlib import Path

GLOBALS = (
    "float* g_store[16]; long g_step = 0; long g_n = 0; bool g_on = false;\n"
    "thread_local const float* g_read = nullptr;\n"
)
FORWARD = "  layer1_gates<V>(P, x, act, ip[F_H] ? X : 2, ip[F_C] != nullptr);\n"
STORE = (
    "  if (g_on) for (long r = 0; r < 4 * H; r++) for (long v = 0; v < V; v++) "
    "put(true, g_store[g_step] + r * so + jo + v * L, act[r * V + v]);\n"
)
RECOMPUTE = "  layer1_gates<V>(P, x, act, X);\n  for (long k = 0; k < H; k++) {"
READ = (
    "  if (g_on) { for (long r = 0; r < R; r++) for (long v = 0; v < V; v++) "
    "act[r * V + v] = ld(g_read + r * g_n + j + v * L); } else layer1_gates<V>(P, x, act, X);\n"
    "  for (long k = 0; k < H; k++) {"
)
CHAIN_STEP = "      const Params P{H, W[s], b[s], W2, nullptr};\n      sums.clear();"
CHAIN_READ = "      g_read = g_on ? g_store[s] + j : nullptr;\n"


def main() -> None:
    source = Path(sys.argv[1]).read_text()
    edits = [
        ("constexpr long BLOCK = 512;", GLOBALS + "constexpr long BLOCK = 512;"),
        (FORWARD, FORWARD + STORE),
        (RECOMPUTE, READ),
        (CHAIN_STEP, CHAIN_READ + CHAIN_STEP),
    ]
    for old, new in edits:
        if old not in source:
            raise SystemExit(f"not in the source: {old!r}")
        source = source.replace(old, new, 1)
    Path("stored.cpp").write_text(source)


if __name__ == "__main__":
    main()
