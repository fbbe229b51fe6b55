"""Makes stored.cpp from 9111c71's native_step.cpp (the argument): the forward writes layer 1's
gate activations of every step to its own buffer (streaming stores) and the chain backward reads
them instead of computing them again, when `g_on`. A measurement variant, not library code."""

import sys

src = open(sys.argv[1]).read()


def replace(old: str, new: str) -> None:
    global src
    assert old in src, old
    src = src.replace(old, new, 1)


replace(
    "constexpr long BLOCK = 512;",
    "float* g_store[16]; long g_step = 0; long g_n = 0; bool g_on = false;\n"
    "thread_local const float* g_read = nullptr;\nconstexpr long BLOCK = 512;",
)
old = "  layer1_gates<V>(P, x, act, ip[F_H] ? X : 2, ip[F_C] != nullptr);\n"
replace(
    old,
    old + "  if (g_on) for (long r = 0; r < 4 * H; r++) for (long v = 0; v < V; v++) "
    "put(true, g_store[g_step] + r * so + jo + v * L, act[r * V + v]);\n",
)
replace(
    "  layer1_gates<V>(P, x, act, X);\n  for (long k = 0; k < H; k++) {",
    "  if (g_on) { for (long r = 0; r < R; r++) for (long v = 0; v < V; v++) "
    "act[r * V + v] = ld(g_read + r * g_n + j + v * L); } else layer1_gates<V>(P, x, act, X);\n"
    "  for (long k = 0; k < H; k++) {",
)
old = "      const Params P{H, W[s], b[s], W2, nullptr};\n      sums.clear();"
replace(old, "      g_read = g_on ? g_store[s] + j : nullptr;\n" + old)
open("stored.cpp", "w").write(src)
