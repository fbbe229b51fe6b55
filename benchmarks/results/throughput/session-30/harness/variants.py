"""The variants of native_step.cpp measured in session 30 with forward_chain.cpp and
chain_backward.cpp, written beside this file from the source at 3438f19:

    git show 3438f19:src/metalstm/methods/metalearner/native_step.cpp > base.cpp
    python variants.py base.cpp
    g++ -O3 -march=native -fopenmp -DSRC='"noact.cpp"' forward_chain.cpp -o forward_noact

Knock-outs (wrong numbers, for timing only): ``noact`` layer 1's activations and tanh c_t replaced
by a multiply, ``noprod`` layer 1's products skipped, ``none`` both. Layouts and blocks (the same
numbers): ``tiled`` every row of the forward's inputs and outputs in blocks of 512 coordinates
laid out one after another (a block's rows contiguous: what a blocked state layout would give),
``fb1024``/``fb2048`` the forward's blocks of 1024 / 2048 coordinates, ``wg6`` the chain
backward's weight gradient in 4 x 6 tiles, x's rows outermost, accumulators zeroed in registers
(the compiler had zeroed them with a call to memset).
"""

import sys
from pathlib import Path

ACTIVATIONS = [
    ("act[e] = vsigmoid(act[e]);                       // i", "act[e] = act[e] * 0.5f;"),
    ("act[e] = vsigmoid(act[e]);    // f", "act[e] = act[e] * 0.5f;"),
    ("act[e] = vsigmoid(act[e]);          // o", "act[e] = act[e] * 0.5f;"),
    ("act[e] = vtanh(act[e]);                 // g", "act[e] = act[e] * 0.5f;"),
    ("vf hn = act[2 * H * V + e] * vtanh(cn);", "vf hn = act[2 * H * V + e] * cn;"),
]
PRODUCTS = [
    (
        "layer1_gates<V>(P, x, act, ip[F_H] ? X : 2, ip[F_C] != nullptr);",
        "layer1_gates<V>(P, x, act, 0, ip[F_C] != nullptr);",
    )
]
FORWARD_ITEMS = """      for (long t = 0; t < F_NIN; t++)
        in_e[t] = {in[t].p ? in[t].p + e * in[t].rows * n : nullptr, in[t].rows};
      for (long t = 0; t < F_NOUT; t++)
        out_e[t] = {out[t].p ? out[t].p + e * out[t].rows * n : nullptr, out[t].rows};
      const Params P{H, W, b + e * 4 * H, W2, b2};
      run_block(in_e, out_e, n, j, std::min(BLOCK, n - j), buffer, stream,"""
TILED = [
    (
        FORWARD_ITEMS,
        FORWARD_ITEMS.replace("e * in[t].rows * n :", "e * in[t].rows * n + j * in[t].rows :")
        .replace("e * out[t].rows * n :", "e * out[t].rows * n + j * out[t].rows :")
        .replace("run_block(in_e, out_e, n, j,", "run_block(in_e, out_e, BLOCK, 0,"),
    )
]


def forward_block(size: int) -> list[tuple[str, str]]:
    return [
        ("  const long blocks = blocks_of(n);\n#pragma omp parallel num_threads(threads)\n  {\n"
         "    FlushDenormals flush;\n    std::vector<float>& buffer = thread_buffer();",
         f"  const long blocks = (n + {size} - 1) / {size};\n#pragma omp parallel "
         "num_threads(threads)\n  {\n    FlushDenormals flush;\n"
         "    std::vector<float>& buffer = thread_buffer();"),
        ("j = item % blocks * BLOCK;", f"j = item % blocks * {size};"),
        ("std::min(BLOCK, n - j), buffer, stream,", f"std::min({size}L, n - j), buffer, stream,"),
    ]  # fmt: skip


WEIGHT_GRADIENT = [
    (
        """  for (long r = 0; r < R; r += 4) {
    const float* dz = sums.dz + r * PITCH;
    long k = 0;
    for (; k + 4 <= X; k += 4)
      weight_gradient_tile<4>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
    for (; k + 2 <= X; k += 2)
      weight_gradient_tile<2>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
    for (; k < X; k++)
      weight_gradient_tile<1>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
  }""",
        """  auto tiles = [&](auto KX, long k) {
    for (long r = 0; r < R; r += 4)
      weight_gradient_tile<KX>(X, sums.dz + r * PITCH, x_rows + k * pitch, pitch, columns,
                               d_W + r * X + k);
  };
  long k = 0;
  for (; k + 6 <= X; k += 6) tiles(std::integral_constant<long, 6>{}, k);
  for (; k + 4 <= X; k += 4) tiles(std::integral_constant<long, 4>{}, k);
  for (; k + 2 <= X; k += 2) tiles(std::integral_constant<long, 2>{}, k);
  for (; k < X; k++) tiles(std::integral_constant<long, 1>{}, k);""",
    )
]

TILE_LOOPS = [
    (
        "  vf a[4][KX] = {};\n",
        "  vf a[4][KX];\n#pragma GCC unroll 4\n  for (long q = 0; q < 4; q++)\n"
        "#pragma GCC unroll 8\n    for (long e = 0; e < KX; e++) a[q][e] = vf{};\n",
    ),
    (
        "#pragma GCC unroll 4\n    for (long e = 0; e < KX; e++) xv[e]",
        "#pragma GCC unroll 8\n    for (long e = 0; e < KX; e++) xv[e]",
    ),
    (
        "#pragma GCC unroll 4\n      for (long e = 0; e < KX; e++) a[q][e] += d * xv[e];",
        "#pragma GCC unroll 8\n      for (long e = 0; e < KX; e++) a[q][e] += d * xv[e];",
    ),
]

VARIANTS = {
    "noact": ACTIVATIONS,
    "noprod": PRODUCTS,
    "none": ACTIVATIONS + PRODUCTS,
    "tiled": TILED,
    "fb1024": forward_block(1024),
    "fb2048": forward_block(2048),
    "wg6": WEIGHT_GRADIENT + TILE_LOOPS,
}

if __name__ == "__main__":
    source = Path(sys.argv[1]).read_text()
    for name, changes in VARIANTS.items():
        text = source
        for old, new in changes:
            if old not in text:
                sys.exit(f"{name}: the source does not hold {old!r}")
            text = text.replace(old, new)
        Path(sys.argv[1]).with_name(f"{name}.cpp").write_text(text)
