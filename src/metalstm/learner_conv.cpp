// The weight gradient of the learner's 3x3 convolutions (padding 1, stride 1 or 2, G groups) on
// every thread, with a summation order that does not depend on the number of threads.
// oneDNN's weight gradient splits its sum over the batch between threads in a thread-dependent
// order, so layers.conv3x3 ran it on one thread; here the output rows are cut into pieces fixed
// by the shapes alone, each piece's sums are taken on whichever thread gets it, and the pieces
// are added in order: the same bits for any thread count, and every core busy.
// Built and loaded by metalstm/native.py (optional: needs a C++ compiler).
//
// Layout: x [B, H, W, G·Ci] and dy [B, Ho, Wo, G·Co] channels-last (NHWC), Co 16, 32 or 64
// output channels per group (1, 2 or 4 vectors of L = 16 on AVX-512, 2, 4 or 8 of 8 on AVX2);
// dW [G·Co, Ci, 3, 3] as
// PyTorch stores a convolution's weight.
//
// ∂W[g, co, ci, kh, kw] = Σ_{b, oy, ox} dy[b, oy, ox, g·Co + co] · x[b, oy·s + kh − 1,
// ox·s + kw − 1, g·Ci + ci] (zero outside the image). For one kernel row kh, the values a pixel
// multiplies are a patch row of 3 input pixels: 3·Ci consecutive floats of a tile that holds
// the group's Ci channels of each input pixel (copied once per tile: with G episodes in one
// pass, a tile of all G·Ci channels made every group's pieces copy, and stride over, G times
// the input they read). A block of J of them times the pixel's Co gradients is
// J x V vector multiply-adds (V of the Co/L vectors of gradients per pass) into accumulators
// that stay in registers over all the pixels of a piece, reading each pixel's gradient vectors
// once per block.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Output channels per vector: 16 on AVX-512; else 8, a vector the width of AVX2's registers (GCC
// lowered 16-float vectors on AVX2 into moves through general registers and the stack: 6 GFLOP/s,
// against 200-270 on AVX-512, on the same Xeon built with -march=znver1). Each weight's sum runs
// over the same pixels in the same order for any vector width: the same bits.
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
constexpr long L = 16;
constexpr int MAX_ACCUMULATORS = 24;  // of 32 vector registers: J x V of them
constexpr int MAX_VECTORS = 4;        // output-channel vectors per pass over a tile
#else
typedef float vf __attribute__((vector_size(32)));
constexpr long L = 8;
constexpr int MAX_ACCUMULATORS = 12;  // of 16 vector registers
constexpr int MAX_VECTORS = 2;
#endif
constexpr long MAX_CO = 64;  // output channels per group
constexpr long MAX_PIECES = 16;        // pieces of the output rows (per group, at most)
constexpr double PIECE_WORK = 1 << 21;  // multiply-adds a piece should hold at least
constexpr long TILE_FLOATS = 1 << 16;    // x and ∂y floats of a tile of output rows (256 KB)

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

struct Shape {
  long B, H, W, Ci, Ho, Wo, Co, G, stride;
  long cin() const { return G * Ci; }
  long cout() const { return G * Co; }
};

// a[jj][v] += x[jj] · dy[v] for `count` pixels: J patch values at xs (advancing x_step floats
// per pixel) times V gradient vectors at ds (advancing d_step). The loops over jj and v are
// unrolled, so that the J x V sums stay in registers through the pixels, and from one call to
// the next when inlined in a loop (patch_block's over rows).
template <int V, int J>
inline void accumulate(vf (&a)[J][V], const float* xs, long x_step, const float* ds, long d_step,
                       long count) {
  for (long p = 0; p < count; p++, xs += x_step, ds += d_step) {
    vf d[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; v++) d[v] = ld(ds + v * L);
#pragma GCC unroll 32
    for (int jj = 0; jj < J; jj++)
#pragma GCC unroll 8
      for (int v = 0; v < V; v++) a[jj][v] += xs[jj] * d[v];
  }
}

// A tile of output rows' input rows for one kernel row kh, group g's channels only, each padded
// with a zero pixel on both sides ([rows, W + 2, Ci]): a pixel's patch row then starts at padded
// column ox·s, and every pixel of a row takes the same code. `valid[r]` is false where the input
// row lies in the zero padding above or below the image.
struct Tile {
  std::vector<float> rows;
  std::vector<char> valid;
  long pitch = 0;  // floats per padded row
};

void fill_tile(const Shape& S, const float* x, long g, long t0, long t1, long kh, Tile& T) {
  const long Ci = S.Ci, cin = S.cin(), n = t1 - t0;
  T.pitch = (S.W + 2) * Ci;
  if (static_cast<long>(T.rows.size()) < n * T.pitch) T.rows.resize(n * T.pitch);
  T.valid.assign(n, 0);
  for (long r = 0; r < n; r++) {
    const long row = t0 + r, b = row / S.Ho, iy = (row % S.Ho) * S.stride + kh - 1;
    if (iy < 0 || iy >= S.H) continue;
    float* out = T.rows.data() + r * T.pitch;
    const float* in = x + (b * S.H + iy) * S.W * cin + g * Ci;
    std::memset(out, 0, Ci * sizeof(float));
    if (S.G == 1)  // the row's pixels are already consecutive
      std::memcpy(out + Ci, in, S.W * Ci * sizeof(float));
    else
      for (long w = 0; w < S.W; w++)
        std::memcpy(out + (w + 1) * Ci, in + w * cin, Ci * sizeof(float));
    std::memset(out + (S.W + 1) * Ci, 0, Ci * sizeof(float));
    T.valid[r] = 1;
  }
}

// One block of J patch values (at `offset` in a pixel's patch row) over the tile's output rows
// t0 .. t1 − 1 of group g, for V vectors of output channels from channel co: the sums added to
// out [J, Co] (set when `first`).
template <int V, int J>
void patch_block(const Shape& S, const Tile& T, const float* dy, long g, long t0, long t1,
                 long offset, long co, float* out, bool first) {
  out += co;
  vf A[J][V];
#pragma GCC unroll 32
  for (int jj = 0; jj < J; jj++)
#pragma GCC unroll 8
    for (int v = 0; v < V; v++) A[jj][v] = first ? vf{} : ld(out + jj * S.Co + v * L);
  const long cout = S.cout();
  for (long r = 0; r < t1 - t0; r++) {
    if (!T.valid[r]) continue;  // the zero padding: no contribution
    accumulate<V, J>(A, T.rows.data() + r * T.pitch + offset, S.stride * S.Ci,
                     dy + (t0 + r) * S.Wo * cout + g * S.Co + co, cout, S.Wo);
  }
#pragma GCC unroll 32
  for (int jj = 0; jj < J; jj++)
#pragma GCC unroll 8
    for (int v = 0; v < V; v++) st(out + jj * S.Co + v * L, A[jj][v]);
}

// patch_block with J = jn (1 .. J), the blocks' size being a compile-time constant.
template <int V, int J>
void patch_block_of(long jn, const Shape& S, const Tile& T, const float* dy, long g, long t0,
                    long t1, long offset, long co, float* out, bool first) {
  if (jn == J)
    patch_block<V, J>(S, T, dy, g, t0, t1, offset, co, out, first);
  else if constexpr (J > 1)
    patch_block_of<V, J - 1>(jn, S, T, dy, g, t0, t1, offset, co, out, first);
}

// Output rows per tile: about TILE_FLOATS of ∂y and padded x, so that the passes over a tile
// (one per block of patch values) read them from L2.
long tile_rows(const Shape& S) {
  return std::max<long>(1, TILE_FLOATS / (S.Wo * S.cout() + (S.W + 2) * S.Ci));
}

// One piece: output rows r0 .. r1 − 1 of group g, every weight of the group, into P [3, 3·Ci,
// Co] (kernel row, then kw·Ci + ci), a tile at a time, rows in order; V vectors of the Co output
// channels per pass over a tile.
template <int V>
void piece(const Shape& S, const float* x, const float* dy, long g, long r0, long r1, Tile& T,
           float* P) {
  constexpr int JM = MAX_ACCUMULATORS / V;
  const long length = 3 * S.Ci;  // a patch row: 3 pixels' Ci channels, consecutive in the tile
  for (long t0 = r0; t0 < r1; t0 += tile_rows(S)) {
    const long t1 = std::min(r1, t0 + tile_rows(S));
    for (long kh = 0; kh < 3; kh++) {
      fill_tile(S, x, g, t0, t1, kh, T);
      for (long c0 = 0; c0 < length; c0 += JM) {
        const long jn = std::min<long>(JM, length - c0);
        float* out = P + (kh * 3 * S.Ci + c0) * S.Co;
        for (long co = 0; co < S.Co; co += V * L)
          patch_block_of<V, JM>(jn, S, T, dy, g, t0, t1, c0, co, out, t0 == r0);
      }
    }
  }
}

constexpr long CHANNEL_BLOCK = 16;  // input channels per unit of adding the pieces
long channel_blocks(long Ci) { return (Ci + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK; }

// The pieces' sums P_k [3, 3·Ci, Co] of group g added in order (k = 0, 1, ...) for the input
// channels of block `block`, into PyTorch's dW [G·Co, Ci, 3, 3]. Through a tile [ci, tap, Co] in
// L1, so that both the pieces' sums (contiguous in co) and dW (contiguous in ci and tap) are read
// and written in order: scattering each sum to its place in dW cost more than the sums.
void add_pieces(const Shape& S, const float* partial, long pieces, long g, long block,
                float* dw) {
  const long Ci = S.Ci, Co = S.Co, size = 9 * Ci * Co;
  const long c0 = block * CHANNEL_BLOCK, cn = std::min(CHANNEL_BLOCK, Ci - c0);
  float tile[CHANNEL_BLOCK * 9 * MAX_CO];  // [ci, tap, Co]
  const float* sums = partial + g * pieces * size;
  for (long ci = 0; ci < cn; ci++)
    for (long tap = 0; tap < 9; tap++) {
      const float* first = sums + (tap * Ci + c0 + ci) * Co;
      float* t = tile + (ci * 9 + tap) * Co;
      for (long co = 0; co < Co; co += L) {
        vf total = ld(first + co);
        for (long k = 1; k < pieces; k++) total += ld(first + k * size + co);
        st(t + co, total);
      }
    }
  for (long co = 0; co < Co; co++) {
    float* out = dw + ((g * Co + co) * Ci + c0) * 9;  // cn · 9 consecutive weights
    for (long e = 0; e < cn * 9; e++) out[e] = tile[e * Co + co];
  }
}

}  // namespace

extern "C" {

int metalstm_conv_abi() { return 1; }

// ∂W [G·Co, Ci, 3, 3] of y = conv3x3(x, W, stride, padding 1, G groups) for ∂y; Co must be
// 16, 32 or 64 (layers.py checks).
void metalstm_conv3x3_weight_grad(long B, long H, long W, long Ci, long Ho, long Wo, long Co,
                                  long G, long stride, int threads, const float* x,
                                  const float* dy, float* dw) {
  const Shape S{B, H, W, Ci, Ho, Wo, Co, G, stride};
  const long rows = B * Ho, size = 9 * Ci * Co;
  // pieces per group: enough work each, at most MAX_PIECES in all, fixed by the shapes alone
  const double work = double(rows) * Wo * size;
  const long most = std::max<long>(1, MAX_PIECES / G);
  const long pieces = std::min(rows, std::clamp<long>(long(std::ceil(work / PIECE_WORK)), 1, most));
  const long tasks = G * pieces;
  // the pieces' sums; kept from call to call (every value is written before it is read), as is
  // each thread's tile: no allocation or zero-filling per call
  static thread_local std::vector<float> sums;
  if (static_cast<long>(sums.size()) < tasks * size) sums.resize(tasks * size);
  float* const partial = sums.data();
#pragma omp parallel num_threads(threads)
  {
    static thread_local Tile T;
#pragma omp for schedule(static)
    for (long t = 0; t < tasks; t++) {
      const long g = t / pieces, k = t % pieces;
      const long r0 = rows * k / pieces, r1 = rows * (k + 1) / pieces;
      float* P = partial + t * size;
      const long per_pass = std::min<long>(Co / L, MAX_VECTORS);  // vectors: 1, 2 or 4
      if (per_pass == 1)
        piece<1>(S, x, dy, g, r0, r1, T, P);
      else if (per_pass == 2)
        piece<2>(S, x, dy, g, r0, r1, T, P);
      else
        piece<4>(S, x, dy, g, r0, r1, T, P);
    }
    // the pieces added in order, into PyTorch's [G·Co, Ci, 3, 3]
#pragma omp for schedule(static)
    for (long unit = 0; unit < G * channel_blocks(Ci); unit++)
      add_pieces(S, partial, pieces, unit / channel_blocks(Ci), unit % channel_blocks(Ci), dw);
  }
}

}  // extern "C"
