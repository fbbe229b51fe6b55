// The meta-learner's inner step (kernels.step_forward / kernels.step_backward) fused per
// coordinate: every quantity of a coordinate (its 2 + H inputs, 4H gate activations, cell, hidden
// state, gate logits and update) stays in registers or L1 while it is computed, instead of one
// pass over [H, n] tensors per operation. Same layout as the Python kernels: every tensor [r, n]
// row-major, coordinates contiguous; L coordinates per vector (GCC vector extensions: 16 on
// AVX-512, else 8). Built and loaded by native.py (optional: needs a C++ compiler).
//
// The forward writes nothing for the backward beyond the step's outputs: the backward computes
// layer 1's gate activations, c_t, tanh c_t and h_t again from the step's inputs. That is about
// 5,000 vector operations per vector of coordinates where reading back the 5H values per coordinate
// the forward would have written (after the learner's passes have evicted them from cache)
// took longer, and T steps of them are not held in memory through an episode.
//
// A first-order meta-gradient's T steps form a chain with nothing between their backwards (L_t
// and g_t are constants), so metalstm_chain_backward runs steps T .. 1 one block of coordinates
// at a time: the gradients each step hands the previous one (∂h, ∂c, ∂θ, ∂logits, 2H + 3 rows)
// stay in the block's scratch instead of being written out and read back per step.
//
// Determinism: the only sums over coordinates (the parameter gradients) are taken per block of
// BLOCK coordinates and the block sums added in block order, so the result does not depend on
// the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace {

// Coordinates per vector: 16 on AVX-512; else 8, a vector the width of AVX2's registers (GCC
// lowered 16-float vectors on AVX2 into moves through general registers and the stack: the step
// took 8-10 times as long as on AVX-512, on the same Xeon built with -march=znver1).
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
constexpr long L = 16;
#else
typedef float vf __attribute__((vector_size(32)));
typedef int vi __attribute__((vector_size(32)));
constexpr long L = 8;
#endif
constexpr long BLOCK = 512;   // coordinates per block (threads' unit; reduction unit)
constexpr long MAX_H = 64;    // largest hidden size with a native kernel
// A step forward whose outputs take more bytes than this writes them with streaming stores
// (put): they write whole lines to memory without reading them into the cache first, and the
// outputs are read again only at the next step, after the learner's passes have evicted them.
// On the AVX-512 Xeon, 8 Omniglot evaluation episodes at once (161 MB of outputs) took 2 %
// longer without them; one of 64 filters (20 MB) took longer with them (the next step found
// fewer of its inputs in the cache).
constexpr long STREAM_BYTES = 32L << 20;
constexpr long PITCH = BLOCK + L;  // row stride of a block's scratch rows: not a multiple of
                                   // 4 KB, so one column's rows do not share a few cache sets

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// st, or with a streaming store (`stream`, on AVX-512, where p is 64-byte aligned): see
// STREAM_BYTES. The caller orders streaming stores with an sfence (fence_streams).
inline void put(bool stream, float* p, vf v) {
#if defined(__AVX512F__)
  if (stream && reinterpret_cast<std::uintptr_t>(p) % 64 == 0) return _mm512_stream_ps(p, v);
#endif
  st(p, v);
}
inline void fence_streams() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}
inline vf splat(float a) { return vf{} + a; }

// exp(x) for float32, Cephes' expf: 2^k · p(r), k = round(x / ln 2), |r| ≤ ln2 / 2, about 1 ulp.
inline vf exp_polynomial(vf r) {
  vf z = r * r;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * z + r + 1.0f;
}

// Range reduction for e^x = 2^k e^r: k = round(x / ln 2) as a float, and r = x − k ln 2
// (|r| ≤ ln2 / 2), with ln 2 in two parts.
inline vf round_log2(vf x) {
#if defined(__AVX512F__)
  return _mm512_roundscale_ps(x * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  vf fx = x * 1.44269504088896341f + 0.5f;
  vf tf = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);  // toward zero
  return tf > fx ? tf - 1.0f : tf;                                       // floor(x / ln2 + 1/2)
#endif
}

inline vf reduced(vf x, vf k) {
  vf r = x - k * 0.693359375f;
  return r - k * -2.12194440e-4f;
}

// p · 2^k for integer-valued k (AVX-512: one instruction).
inline vf times_pow2(vf p, vf k) {
#if defined(__AVX512F__)
  return _mm512_scalef_ps(p, k);
#else
  vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
#endif
}

// x clamped to [−bound, bound], NaN to bound: `x < bound ? x : bound`, then `x > −bound ? x : −bound`;
// on AVX-512 one min and one max, which return their second operand where the comparison fails.
inline vf clamp_to(vf x, float bound) {
#if defined(__AVX512F__)
  return _mm512_max_ps(_mm512_min_ps(x, splat(bound)), splat(-bound));
#else
  x = x < bound ? x : splat(bound);
  return x > -bound ? x : splat(-bound);
#endif
}

inline vf vexp(vf x) {
  x = clamp_to(x, 88.3762626647949f);
  vf k = round_log2(x);
  return times_pow2(exp_polynomial(reduced(x, k)), k);
}

// 1 / d: on AVX-512 the 14-bit estimate and one Newton step (about 1 ulp, a few cycles where a
// division costs tens), else a division.
inline vf reciprocal(vf d) {
#if defined(__AVX512F__)
  vf r = _mm512_rcp14_ps(d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

inline vf vsigmoid(vf x) { return reciprocal(1.0f + vexp(-x)); }

// e^r − 1 for |r| ≤ ln2 / 2: its Taylor series to r^7 (truncation below 2^-25 relative).
inline vf expm1_polynomial(vf r) {
  vf p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r;
}

// tanh(x) = e / (e + 2) with e = e^2x − 1, one branch-free formula: e^2x − 1 = 2^k (e^r − 1) +
// (2^k − 1), k = round(2x / ln 2), keeps small arguments' relative precision (k = 0 there), and
// 2x is clamped to ±20, beyond which tanh rounds to ±1 in float32.
inline vf vtanh(vf x) {
  vf y = x + x;
  y = clamp_to(y, 20.0f);
  vf k = round_log2(y), scale = times_pow2(splat(1.0f), k);
  vf e = scale * expm1_polynomial(reduced(y, k)) + (scale - 1.0f);
  return e * reciprocal(e + 2.0f);
}

// log x for positive finite normal floats (Cephes' logf, about 1 ulp): x = m 2^e with m in [√½, √2),
// log x = log m + e ln 2, log m from a polynomial in m − 1 (ln 2 in two parts).
inline vf vlog(vf x) {
  vi bits;
  std::memcpy(&bits, &x, sizeof bits);
  vi e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // m in [½, 1)
  vf m;
  std::memcpy(&m, &bits, sizeof m);
  const vi low = m < 0.707106781186547524f;
  e += low;                                    // −1 where m < √½ (true is −1)
  m = (low ? m + m : m) - 1.0f;
  vf ef = __builtin_convertvector(e, vf), z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += ef * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + ef * 0.693359375f;
}

// The meta-learner's input preprocessing of Andrychowicz et al. (2016), as kernels.preprocess:
// (log|x| / p, sign x) where |x| ≥ e^-p, else (−1, e^p x); e^-p and e^p are computed in double
// and rounded to float, as PyTorch rounds the Python floats of the eager code.
struct Preprocessing {
  float p, threshold, scale;
  explicit Preprocessing(double p)
      : p(static_cast<float>(p)),
        threshold(static_cast<float>(std::exp(-p))),
        scale(static_cast<float>(std::exp(p))) {}
  void operator()(vf x, vf& log_part, vf& sign_part) const {
    const vf a = x < 0.0f ? -x : x;
    const vi big = a >= threshold;  // false for NaN: (−1, NaN), as the eager code
    const vf log_a = a == __builtin_huge_valf() ? a : vlog(a);  // log ∞ = ∞
    log_part = big ? log_a / p : splat(-1.0f);
    sign_part = big ? (x > 0.0f ? splat(1.0f) : splat(-1.0f)) : x * scale;
  }
};

typedef float vf4 __attribute__((vector_size(16)));

// The sum of a vector's lanes, by halves (a fixed order: the same result on every run). On
// AVX-512 the halves are taken in registers (through memory, the 32-byte reloads of a 64-byte
// store could not be forwarded from it, a stall per sum).
inline float hsum(vf v) {
#if defined(__AVX512F__)
  const __m512 m = v;
  const __m256 high = _mm512_castps512_ps256(_mm512_shuffle_f32x4(m, m, 0xEE));  // lanes 8-15
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(m), high);
  const vf4 c = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
#else
  vf4 c, d;
  std::memcpy(&c, &v, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&v) + sizeof c, sizeof d);
  c += d;
#endif
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// Treat subnormal floats as zero on this thread while alive (the Python side does the same for
// its own thread; OpenMP's worker threads need it too).
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// A tensor [rows, n] seen at one vector of coordinates: base pointer and row stride.
struct Rows {
  const float* p;
  long rows;
};
struct OutRows {
  float* p;
  long rows;
};

// The 64-byte aligned start of a scratch buffer with room for `floats` (plus up to a line's 16
// floats of alignment: more than a vector's L without AVX-512).
float* aligned_scratch(std::vector<float>& buffer, long floats) {
  constexpr long LINE = 64 / sizeof(float);
  if (static_cast<long>(buffer.size()) < floats + LINE) buffer.resize(floats + LINE);
  return buffer.data() + ((64 - reinterpret_cast<std::uintptr_t>(buffer.data()) % 64) % 64) / 4;
}

// Rows [rows, n] (row stride n) at columns j .. j + count − 1 into dst (row pitch `pitch`, the
// columns up to `width` zero); src null: zeros (the LSTM's initial state).
void copy_rows(const float* src, long rows, long n, long j, long count, long width, long pitch,
               float* dst) {
  for (long r = 0; r < rows; r++) {
    float* d = dst + r * pitch;
    if (src) std::memcpy(d, src + r * n + j, count * sizeof(float));
    std::memset(d + (src ? count : 0), 0, (width - (src ? count : 0)) * sizeof(float));
  }
}

// f(V, column) on the vectors of a block `width` columns wide: on AVX-512 two at a time (V = 2:
// twice the independent chains in the step's products and activations; on the AVX-512 Xeon the
// forward took 5-6 % less time, the chain backward 4-5 %), the last one alone where their number
// is odd; else one at a time (two vectors' accumulators are twice the 16 AVX2 registers). V is a
// std::integral_constant, usable as a template argument.
template <class F>
void for_each_vector_pair(long width, F f) {
  long c = 0;
#if defined(__AVX512F__)
  for (; c + 2 * L <= width; c += 2 * L) f(std::integral_constant<long, 2>{}, c);
#endif
  for (; c < width; c += L) f(std::integral_constant<long, 1>{}, c);
}

// Where V vectors of coordinates are in a set of rows: the rows' stride and the first vector's
// column (vector v's at column + L v); `stream`: outputs written there with streaming stores
// (put).
struct At {
  long stride, column;
  bool stream = false;
};

// Runs body(V, in, src, out, dst) on every vector of the block of `count` coordinates that starts
// at column j of rows with stride `stride` (two at a time, for_each_vector_pair), then
// finish(in, pitch); `stream`: the outputs' rows written with streaming stores, then fenced. The body reads a private copy of the block's input rows (`buffer`; row pitch
// a multiple of L plus L, zero-padded): rows that are aligned, a known pitch apart and in L1/L2
// (reading the tensors' rows in place, their strides slowed it several-fold for some n), with no
// tail case. It writes whole vectors of outputs straight to their rows, and a last partial vector
// to `buffer`, whose columns are then copied out. (Writing the block's outputs to `buffer` and
// copying them out, with streaming stores above 32 MB, the forward took 11-14 % longer at 28,500
// and 57,000 coordinates on the AVX-512 Xeon and as long at 228,000.)
template <long NI, long NO, class Body, class Finish>
void run_block(const Rows (&in)[NI], const OutRows (&out)[NO], long stride, long j, long count,
               std::vector<float>& buffer, bool stream, Body body, Finish finish) {
  const long width = (count + L - 1) / L * L, pitch = width + L, whole = count / L * L;
  long in_rows = 0, out_rows = 0;
  for (const Rows& r : in) in_rows += r.p ? r.rows : 0;
  for (const OutRows& r : out) out_rows += r.p ? r.rows : 0;
  float* next = aligned_scratch(buffer, in_rows * pitch + out_rows * L);
  Rows in_local[NI];
  OutRows tail[NO];
  for (long t = 0; t < NI; t++) {
    in_local[t] = {in[t].p ? next : nullptr, in[t].rows};
    if (!in[t].p) continue;
    copy_rows(in[t].p, in[t].rows, stride, j, count, width, pitch, next);
    next += in[t].rows * pitch;
  }
  for (long t = 0; t < NO; t++) {
    tail[t] = {out[t].p ? next : nullptr, out[t].rows};
    if (out[t].p) next += out[t].rows * L;
  }
  for_each_vector_pair(whole, [&](auto V, long c) {
    body(V, in_local, At{pitch, c}, out, At{stride, j + c, stream});
  });
  if (whole < count) {
    body(std::integral_constant<long, 1>{}, in_local, At{pitch, whole}, tail, At{L, 0});
    for (long t = 0; t < NO; t++)
      for (long r = 0; tail[t].p && r < tail[t].rows; r++)
        std::memcpy(out[t].p + r * stride + j + whole, tail[t].p + r * L,
                    (count - whole) * sizeof(float));
  }
  if (stream) fence_streams();  // the streaming stores ordered before what follows
  finish(in_local, pitch);
}

// -- forward --------------------------------------------------------------------------------------

enum FwdIn { F_FEATURES, F_H, F_C, F_THETA, F_PREV, F_GRAD, F_NIN };
enum FwdOut { F_THETA_NEW, F_LOGITS, F_H_NEW, F_C_NEW, F_GATES, F_NOUT };

struct Params {
  long H;
  const float *W, *b, *W2, *b2;  // [4H, 2 + H], [4H], [2, H + 2], [2]
};

// Q rows of a product M y for V vectors of coordinates, M's element (q, k) at m[q qs + k ks] (W x:
// qs = X, ks = 1; Wᵀ ∂z: qs = 1, ks = X) and y's element (k, v) at y[k V + v]: Q V accumulators in
// registers, each started at start(q) and summed over k = 0 .. K − 1 in order; store(q, v, sum).
template <long Q, long V, class Start, class Store>
inline void product_rows(const float* m, long qs, long ks, const vf* y, long K, Start start,
                         Store store) {
  vf a[Q][V];
#pragma GCC unroll 8
  for (long q = 0; q < Q; q++)
#pragma GCC unroll 2
    for (long v = 0; v < V; v++) a[q][v] = start(q);
  for (long k = 0; k < K; k++)
#pragma GCC unroll 8
    for (long q = 0; q < Q; q++)
#pragma GCC unroll 2
      for (long v = 0; v < V; v++) a[q][v] += m[q * qs + k * ks] * y[k * V + v];
#pragma GCC unroll 8
  for (long q = 0; q < Q; q++)
#pragma GCC unroll 2
    for (long v = 0; v < V; v++) store(q, v, a[q][v]);
}

// Rows r .. r + Q − 1 of W x + b into act (element (r, v) at r V + v).
template <long Q, long V>
inline void gate_rows(const Params& P, long r, const vf* x, long width, vf* act) {
  const long X = 2 + P.H;
  product_rows<Q, V>(
      P.W + r * X, X, 1, x, width, [&](long q) { return splat(P.b[r + q]); },
      [&](long q, long v, vf sum) { act[(r + q) * V + v] = sum; });
}

// Layer 1's gate activations act = (σ(i), σ(f), σ(o), tanh(g)) = act(W x + b) [4H] of V vectors
// of coordinates (element (r, v) at r V + v), from their input x = [features; h] [2 + H] (element
// (k, v) at k V + v): the pre-activations eight rows at a time (8 V independent FMA chains), then
// four (4H is a multiple of 4). `width` = 2: h = 0 (the initial state), whose products add exact
// zeros and are skipped. `forget` false: σ(f) is not wanted (c_{t-1} = 0, where c_t = i ⊙ g) and
// is left uncomputed. Every lane sums its products in the same order for any V.
template <long V>
void layer1_gates(const Params& P, const vf* x, vf* act, long width, bool forget = true) {
  const long H = P.H, R = 4 * H;
  long r = 0;
  for (; r + 8 <= R; r += 8) gate_rows<8, V>(P, r, x, width, act);
  for (; r < R; r += 4) gate_rows<4, V>(P, r, x, width, act);
  for (long e = 0; e < H * V; e++) act[e] = vsigmoid(act[e]);                       // i
  for (long e = H * V; forget && e < 2 * H * V; e++) act[e] = vsigmoid(act[e]);    // f
  for (long e = 2 * H * V; e < 3 * H * V; e++) act[e] = vsigmoid(act[e]);          // o
  for (long e = 3 * H * V; e < R * V; e++) act[e] = vtanh(act[e]);                 // g
}

// V vectors of coordinates through the whole step: inputs from rows at `src`, outputs to rows at
// `dst` (run_block's At).
template <long V>
void forward_vector(const Params& P, const Rows (&in)[F_NIN], At src,
                    const OutRows (&out)[F_NOUT], At dst) {
  // Local copies of the pointers: stores through float* cannot change them, so they
  // stay in registers.
  const float* ip[F_NIN];
  float* op[F_NOUT];
  for (long t = 0; t < F_NIN; t++) ip[t] = in[t].p;
  for (long t = 0; t < F_NOUT; t++) op[t] = out[t].p;
  const long H = P.H, X = 2 + H, s = src.stride, j = src.column, so = dst.stride, jo = dst.column;
  const bool stream = dst.stream;
  vf x[(2 + MAX_H) * V], act[4 * MAX_H * V];
  for (long k = 0; k < 2; k++)
    for (long v = 0; v < V; v++) x[k * V + v] = ld(ip[F_FEATURES] + k * s + j + v * L);
  for (long k = 0; ip[F_H] && k < H; k++)
    for (long v = 0; v < V; v++) x[(2 + k) * V + v] = ld(ip[F_H] + k * s + j + v * L);
  layer1_gates<V>(P, x, act, ip[F_H] ? X : 2, ip[F_C] != nullptr);
  // c_t = f ⊙ c_{t-1} + i ⊙ g (i ⊙ g alone for c_{t-1} = 0: the same number),
  // h_t = o ⊙ tanh c_t; layer 2's logits from h_t on the way.
  // Null h_t, c_t and logits outputs: not wanted (the inner loop's last step at evaluation).
  const bool state = op[F_H_NEW] != nullptr;
  vf l0[V], l1[V];
  for (long v = 0; v < V; v++) l0[v] = splat(P.b2[0]), l1[v] = splat(P.b2[1]);
  for (long k = 0; k < H; k++) {
#pragma GCC unroll 2
    for (long v = 0; v < V; v++) {
      const long e = k * V + v, at = k * s + j + v * L, to = k * so + jo + v * L;
      vf cn = ip[F_C] ? act[H * V + e] * ld(ip[F_C] + at) + act[e] * act[3 * H * V + e]
                      : act[e] * act[3 * H * V + e];
      vf hn = act[2 * H * V + e] * vtanh(cn);
      if (state) {
        put(stream, op[F_C_NEW] + to, cn);
        put(stream, op[F_H_NEW] + to, hn);
      }
      l0[v] += P.W2[k] * hn;
      l1[v] += P.W2[X + k] * hn;
    }
  }
  for (long v = 0; v < V; v++) {
    const long jv = j + v * L, to = jo + v * L;
    vf theta = ld(ip[F_THETA] + jv);
    l0[v] += P.W2[H] * theta + P.W2[H + 1] * ld(ip[F_PREV] + jv);
    l1[v] += P.W2[X + H] * theta + P.W2[X + H + 1] * ld(ip[F_PREV] + s + jv);
    vf g0 = vsigmoid(l0[v]), g1 = vsigmoid(l1[v]);
    if (state) {
      put(stream, op[F_LOGITS] + to, l0[v]);
      put(stream, op[F_LOGITS] + so + to, l1[v]);
    }
    put(stream, op[F_GATES] + to, g0);
    put(stream, op[F_GATES] + so + to, g1);
    put(stream, op[F_THETA_NEW] + to, g0 * theta - g1 * ld(ip[F_GRAD] + jv));  // θ_t
  }
}

// -- backward -------------------------------------------------------------------------------------

enum BwdIn {
  B_FEATURES, B_H, B_C, B_THETA, B_PREV, B_GRAD, B_GATES,
  B_D_THETA, B_D_LOGITS, B_D_H, B_D_C, B_D_GATES, B_NIN
};
enum BwdOut { B_D_FEATURES, B_D_H_PREV, B_D_C_PREV, B_D_THETA_PREV, B_D_PREV_LOGITS, B_D_GRAD, B_NOUT };


// One thread's sums over the vectors of one block (per lane), and the block's ∂z and x columns
// for the weight gradient.
struct BlockSums {
  std::vector<vf> d_b, d_W2, d_b2;
  std::vector<float> dz_storage;
  float* dz;  // [4H, BLOCK], row stride PITCH, 64-byte aligned (in a buffer from the heap, rows
              // 16 bytes off a line: every store and load of ∂z split across two lines, 5 % of
              // the chain backward on the AVX-512 Xeon)
  long H;
  explicit BlockSums(long H)
      : d_b(4 * H), d_W2(2 * (H + 2)), d_b2(2), dz(aligned_scratch(dz_storage, 4 * H * PITCH)),
        H(H) {}
  BlockSums(const BlockSums&) = delete;
  BlockSums(BlockSums&&) = default;  // the storage moves with its pointer
  void clear() {
    for (auto* v : {&d_b, &d_W2, &d_b2})
      for (vf& a : *v) a = vf{};
  }
};

// The step's backward for V vectors of coordinates: inputs from rows at `src` (a block's copy,
// from its column src.column), outputs to rows at `dst`, and the block's sums (per lane, each
// vector's terms added in column order: the same for any V).
template <long V>
void backward_vector(const Params& P, bool need_params, const Rows (&in)[B_NIN],
                     At src, const OutRows (&out)[B_NOUT], At dst, BlockSums& sums) {
  // Local copies of the pointers: stores through float* cannot change them, so they
  // stay in registers.
  const float* ip[B_NIN];
  float* op[B_NOUT];
  for (long t = 0; t < B_NIN; t++) ip[t] = in[t].p;
  for (long t = 0; t < B_NOUT; t++) op[t] = out[t].p;
  vf* const sum_W2 = sums.d_W2.data();
  vf* const sum_b2 = sums.d_b2.data();
  vf* const sum_b = sums.d_b.data();
  float* const sum_dz = sums.dz;
  const long H = P.H, X = 2 + H, R = 4 * H, s = src.stride, j = src.column;
  const long so = dst.stride, jo = dst.column;
  const float* W2 = P.W2;
  auto row = [&](BwdIn t, long r, long v) { return ld(ip[t] + r * s + j + v * L); };
  // Layer 2: θ_t = σ(f) θ_{t-1} − σ(i) g_t; (f, i) = W2 [h_t, θ_{t-1}, logits_{t-1}] + b2.
  vf dl0[V], dl1[V];
  for (long v = 0; v < V; v++) {
    const long to = jo + v * L;
    vf d_theta = row(B_D_THETA, 0, v), theta = row(B_THETA, 0, v), grad = row(B_GRAD, 0, v);
    vf g0 = row(B_GATES, 0, v), g1 = row(B_GATES, 1, v);
    vf d0 = d_theta * theta, d1 = -(d_theta * grad);
    if (ip[B_D_GATES]) d0 += row(B_D_GATES, 0, v), d1 += row(B_D_GATES, 1, v);
    d0 *= g0 - g0 * g0;  // σ' = σ − σ²
    d1 *= g1 - g1 * g1;
    if (ip[B_D_LOGITS]) d0 += row(B_D_LOGITS, 0, v), d1 += row(B_D_LOGITS, 1, v);
    st(op[B_D_THETA_PREV] + to, d0 * W2[H] + d1 * W2[X + H] + d_theta * g0);
    if (op[B_D_PREV_LOGITS]) {
      st(op[B_D_PREV_LOGITS] + to, d0 * W2[H + 1]);
      st(op[B_D_PREV_LOGITS] + so + to, d1 * W2[X + H + 1]);
    }
    if (op[B_D_GRAD]) st(op[B_D_GRAD] + to, -(d_theta * g1));
    if (need_params) {
      vf p0 = row(B_PREV, 0, v), p1 = row(B_PREV, 1, v);
      sum_W2[H] += d0 * theta, sum_W2[X + H] += d1 * theta;
      sum_W2[H + 1] += d0 * p0, sum_W2[X + H + 1] += d1 * p1;
      sum_b2[0] += d0, sum_b2[1] += d1;
    }
    dl0[v] = d0, dl1[v] = d1;
  }
  // Layer 1: h_t = o ⊙ tanh c_t, c_t = f ⊙ c_{t-1} + i ⊙ g, (i, f, o, g) = act(W x + b),
  // computed again from the step's inputs (x = [features; h], c_{t-1}), as the forward computes
  // them: null h and c are the initial state, zeros, not read (h's products and σ(f) skipped,
  // c_t = i ⊙ g), and σ(f)'s logit then gets ∂z = c_{t-1} ⊙ ... = 0. The initial state is a
  // constant: with null h and c, ∂h_{t-1} and ∂c_{t-1} are not asked for (null outputs).
  const bool zero_h = !ip[B_H], zero_c = !ip[B_C];
  vf x[(2 + MAX_H) * V], act[4 * MAX_H * V], dz[4 * MAX_H * V];
  for (long k = 0; k < 2; k++)
    for (long v = 0; v < V; v++) x[k * V + v] = row(B_FEATURES, k, v);
  for (long k = 0; !zero_h && k < H; k++)
    for (long v = 0; v < V; v++) x[(2 + k) * V + v] = row(B_H, k, v);
  layer1_gates<V>(P, x, act, zero_h ? 2 : X, !zero_c);
  for (long k = 0; k < H; k++) {
#pragma GCC unroll 2
    for (long v = 0; v < V; v++) {
      const long e = k * V + v;
      vf i = act[e], f = act[H * V + e], o = act[2 * H * V + e], g = act[3 * H * V + e];
      vf c = zero_c ? vf{} : row(B_C, k, v);
      vf tc = vtanh(zero_c ? i * g : f * c + i * g);  // tanh c_t
      if (need_params) {             // layer 2 read h_t = o ⊙ tanh c_t
        vf hn = o * tc;
        sum_W2[k] += dl0[v] * hn;
        sum_W2[X + k] += dl1[v] * hn;
      }
      vf d_hn = W2[k] * dl0[v] + W2[X + k] * dl1[v];
      if (ip[B_D_H]) d_hn += row(B_D_H, k, v);
      vf d_cn = d_hn * o * (1.0f - tc * tc);
      if (ip[B_D_C]) d_cn += row(B_D_C, k, v);
      dz[e] = d_cn * g * (i - i * i);
      dz[H * V + e] = zero_c ? vf{} : d_cn * c * (f - f * f);
      dz[2 * H * V + e] = d_hn * tc * (o - o * o);
      dz[3 * H * V + e] = d_cn * i * (1.0f - g * g);
      if (op[B_D_C_PREV]) st(op[B_D_C_PREV] + k * so + jo + v * L, d_cn * f);
    }
  }
  if (need_params) {
    for (long r = 0; r < R; r++)
      for (long v = 0; v < V; v++) {
        sum_b[r] += dz[r * V + v];
        st(sum_dz + r * PITCH + j + v * L, dz[r * V + v]);
      }
  }
  // ∂x = Wᵀ ∂z, eight input rows at a time (8 V FMA chains over r), then four, then one;
  // rows 0, 1 (the gradient's features) and rows 2 .. X − 1 (∂h_{t-1}) when asked.
  const long first = op[B_D_FEATURES] ? 0 : 2, end = op[B_D_H_PREV] ? X : 2;
  auto store_dx = [&](long k, long v, vf value) {
    if (k < 2)
      st(op[B_D_FEATURES] + k * so + jo + v * L, value);
    else
      st(op[B_D_H_PREV] + (k - 2) * so + jo + v * L, value);
  };
  auto store_from = [&](long k) { return [&, k](long q, long v, vf value) { store_dx(k + q, v, value); }; };
  auto zero = [](long) { return vf{}; };
  long k = first;
  for (; k + 8 <= end; k += 8) product_rows<8, V>(P.W + k, 1, X, dz, R, zero, store_from(k));
  for (; k + 4 <= end; k += 4) product_rows<4, V>(P.W + k, 1, X, dz, R, zero, store_from(k));
  for (; k < end; k++) product_rows<1, V>(P.W + k, 1, X, dz, R, zero, store_from(k));
}

// The block's ∂W [4H, 2 + H] = Σ_columns ∂z xᵀ: four rows of ∂z by KX rows of x at a time (4 KX
// independent FMA chains, each (r, k) summed over the columns in order, then across lanes).
template <long KX>
void weight_gradient_tile(long X, const float* dz, const float* x, long pitch, long columns,
                          float* d_W) {
  vf a[4][KX] = {};
  for (long c = 0; c < columns; c += L) {
    vf xv[KX];
#pragma GCC unroll 4
    for (long e = 0; e < KX; e++) xv[e] = ld(x + e * pitch + c);
#pragma GCC unroll 4
    for (long q = 0; q < 4; q++) {
      vf d = ld(dz + q * PITCH + c);
#pragma GCC unroll 4
      for (long e = 0; e < KX; e++) a[q][e] += d * xv[e];
    }
  }
  for (long q = 0; q < 4; q++)
    for (long e = 0; e < KX; e++) d_W[q * X + e] = hsum(a[q][e]);
}

// x's rows from `rows` on are zeros (the initial state h = 0: rows = 2), not read: their columns
// of ∂W are zeros, as the sums of zero products give.
void block_weight_gradient(long H, const BlockSums& sums, const float* x_rows, long rows,
                           long pitch, long columns, float* d_W) {
  const long X = 2 + H, R = 4 * H;
  for (long r = 0; r < R; r += 4) {
    const float* dz = sums.dz + r * PITCH;
    long k = 0;
    for (; k + 4 <= rows; k += 4)
      weight_gradient_tile<4>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
    for (; k + 2 <= rows; k += 2)
      weight_gradient_tile<2>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
    for (; k < rows; k++)
      weight_gradient_tile<1>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
    for (long q = 0; q < 4; q++) std::fill(d_W + (r + q) * X + rows, d_W + (r + q) * X + X, 0.0f);
  }
}

long blocks_of(long n) { return (n + BLOCK - 1) / BLOCK; }

// The per-block parameter sums of one step's backward (∂W, ∂b, ∂W2, ∂b2, `per_block` floats),
// from a block's BlockSums and its copy of layer 1's input rows x = [features; h] (`rows` of
// them; the rest zeros, not read).
void block_parameter_sums(long H, const BlockSums& sums, const float* x_rows, long rows,
                          long pitch, long columns, float* part) {
  const long X = 2 + H, R = 4 * H;
  block_weight_gradient(H, sums, x_rows, rows, pitch, columns, part);
  for (long r = 0; r < R; r++) part[R * X + r] = hsum(sums.d_b[r]);
  for (long k = 0; k < 2 * X; k++) part[R * X + R + k] = hsum(sums.d_W2[k]);
  for (long k = 0; k < 2; k++) part[R * X + R + 2 * X + k] = hsum(sums.d_b2[k]);
}

// total[0 .. per_block) = Σ over blocks, in block order, of partial [blocks, per_block].
void add_blocks(const float* partial, long blocks, long per_block, float* total) {
  std::fill(total, total + per_block, 0.0f);
  for (long blk = 0; blk < blocks; blk++)
    for (long k = 0; k < per_block; k++) total[k] += partial[blk * per_block + k];
}

// Each thread's scratch, kept from call to call (OpenMP's threads persist): no allocation or
// zero-filling of a few hundred KB per thread and step.
std::vector<float>& thread_buffer() {
  static thread_local std::vector<float> buffer;
  return buffer;
}

BlockSums& thread_sums(long H) {
  static thread_local std::vector<BlockSums> sums;  // one per hidden size seen
  for (BlockSums& s : sums)
    if (s.H == H) return s;
  return sums.emplace_back(H);
}

// f(blk, j, count, sums, buffer) for every block of BLOCK coordinates (the block's first
// coordinate j and its count), on `threads` threads with their own sums and scratch.
template <class F>
void for_each_block(long n, long H, int threads, F f) {
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals flush;
    BlockSums& sums = thread_sums(H);
    std::vector<float>& buffer = thread_buffer();
#pragma omp for schedule(static)
    for (long blk = 0; blk < blocks_of(n); blk++) {
      const long j = blk * BLOCK;
      f(blk, j, std::min(BLOCK, n - j), sums, buffer);
    }
  }
}

}  // namespace

extern "C" {

int metalstm_native_abi() { return 6; }
long metalstm_native_max_hidden() { return MAX_H; }

// kernels.preprocess_rows of x [E, n] into out [E, 2, n] (each row's log and sign parts), on
// `threads` threads for large inputs; a row's tail shorter than a vector goes through a
// zero-padded copy.
void metalstm_preprocess(long E, long n, int threads, const float* x, double p, float* out) {
  const Preprocessing pre(p);
  const long vectors = n / L, done = vectors * L, rest = n - done;
#pragma omp parallel for num_threads(threads) schedule(static) if (E * n >= (1L << 16))
  for (long item = 0; item < E * (vectors + 1); item++) {
    const long e = item / (vectors + 1), v = item % (vectors + 1);
    const float* row = x + e * n;
    float* log_row = out + 2 * e * n;
    float* sign_row = log_row + n;
    vf a, b;
    if (v < vectors) {
      pre(ld(row + v * L), a, b);
      st(log_row + v * L, a);
      st(sign_row + v * L, b);
    } else if (rest > 0) {
      float tail[L] = {}, log_part[L], sign_part[L];
      std::memcpy(tail, row + done, rest * sizeof(float));
      pre(ld(tail), a, b);
      st(log_part, a);
      st(sign_part, b);
      std::memcpy(log_row + done, log_part, rest * sizeof(float));
      std::memcpy(sign_row + done, sign_part, rest * sizeof(float));
    }
  }
}

// The native kernels' step_forward: the step's five outputs, nothing else (the backward computes
// what it needs again from the inputs), for E episodes at once: every input and output [E, r, n]
// (episode e's rows from e r n on), the layer-1 bias [E, 4H] (each episode's loss is folded into
// its own), the weights shared. h and c null: the initial state, zeros (not read); h_new, c_new
// and logits null (together): not written, only θ_t and the gates.
void metalstm_step_forward(long E, long n, long H, int threads, const float* features,
                           const float* h, const float* c, const float* theta,
                           const float* prev_logits, const float* grad, const float* W,
                           const float* b, const float* W2, const float* b2, float* theta_new,
                           float* logits, float* h_new, float* c_new, float* gates) {
  const Rows in[F_NIN] = {{features, 2}, {h, H}, {c, H}, {theta, 1}, {prev_logits, 2}, {grad, 1}};
  const OutRows out[F_NOUT] = {{theta_new, 1}, {logits, 2}, {h_new, H}, {c_new, H}, {gates, 2}};
  long out_rows = 0;
  for (const OutRows& r : out) out_rows += r.p ? r.rows : 0;
  const bool stream = E * out_rows * n * static_cast<long>(sizeof(float)) > STREAM_BYTES;
  const long blocks = blocks_of(n);
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals flush;
    std::vector<float>& buffer = thread_buffer();
#pragma omp for schedule(static)
    for (long item = 0; item < E * blocks; item++) {
      const long e = item / blocks, j = item % blocks * BLOCK;
      Rows in_e[F_NIN];
      OutRows out_e[F_NOUT];
      for (long t = 0; t < F_NIN; t++)
        in_e[t] = {in[t].p ? in[t].p + e * in[t].rows * n : nullptr, in[t].rows};
      for (long t = 0; t < F_NOUT; t++)
        out_e[t] = {out[t].p ? out[t].p + e * out[t].rows * n : nullptr, out[t].rows};
      const Params P{H, W, b + e * 4 * H, W2, b2};
      run_block(in_e, out_e, n, j, std::min(BLOCK, n - j), buffer, stream,
                [&](auto V, auto& i, At src, auto& o, At dst) {
                  forward_vector<V>(P, i, src, o, dst);
                },
                [](auto&, long) {});
    }
  }
}

// The native kernels' step_backward: from the step's inputs (layer 1's input x = [features; h]
// and c_{t-1}, from which it computes the gate activations again) and layer 2's gates. Null
// inputs: gradients not flowing (d_logits, d_h, d_c, d_gates); null outputs: not wanted
// (d_features and d_grad together; d_W, d_b, d_W2, d_b2 together).
void metalstm_step_backward(long n, long H, int threads, const float* features, const float* h,
                            const float* c, const float* theta, const float* prev_logits,
                            const float* grad, const float* W, const float* b, const float* W2,
                            const float* gates, const float* d_theta, const float* d_logits,
                            const float* d_h, const float* d_c, const float* d_gates,
                            float* d_features, float* d_h_prev, float* d_c_prev,
                            float* d_theta_prev, float* d_prev_logits, float* d_grad, float* d_W,
                            float* d_b, float* d_W2, float* d_b2) {
  const long X = 2 + H, R = 4 * H, blocks = blocks_of(n);
  const Params P{H, W, b, W2, nullptr};
  const bool need_params = d_W != nullptr;
  // features and h first and in this order: their block copies are then the rows of x.
  const Rows in[B_NIN] = {{features, 2},    {h, H},       {c, H},       {theta, 1},
                          {prev_logits, 2}, {grad, 1},    {gates, 2},   {d_theta, 1},
                          {d_logits, 2},    {d_h, H},     {d_c, H},     {d_gates, 2}};
  const OutRows out[B_NOUT] = {{d_features, 2},   {d_h_prev, H},     {d_c_prev, H},
                               {d_theta_prev, 1}, {d_prev_logits, 2}, {d_grad, 1}};
  // Per block: ∂W, ∂b, ∂W2, ∂b2, summed over the block's coordinates.
  const long per_block = R * X + R + 2 * X + 2;
  // (the calling thread's; worker threads reach it through `partial_sums` only)
  static thread_local std::vector<float> partial;
  if (need_params) partial.resize(std::max<std::size_t>(partial.size(), blocks * per_block));
  float* const partial_sums = partial.data();
  for_each_block(n, H, threads, [&](long blk, long j, long count, BlockSums& sums,
                                    std::vector<float>& buffer) {
    sums.clear();
    const long columns = (count + L - 1) / L * L;
    run_block(
        in, out, n, j, count, buffer, false,
        [&](auto V, auto& i, At src, auto& o, At dst) {
          backward_vector<V>(P, need_params, i, src, o, dst, sums);
        },
        [&](auto& i, long pitch) {  // the block's parameter gradients, from its copy of x
          if (need_params)
            block_parameter_sums(H, sums, i[B_FEATURES].p, 2 + H, pitch, columns,
                                 partial_sums + blk * per_block);
        });
  });
  if (!need_params) return;
  // Block sums added in block order: the same result for any number of threads.
  std::vector<float> total(per_block);
  add_blocks(partial_sums, blocks, per_block, total.data());
  std::memcpy(d_W, total.data(), R * X * sizeof(float));
  std::memcpy(d_b, total.data() + R * X, R * sizeof(float));
  std::memcpy(d_W2, total.data() + R * X + R, 2 * X * sizeof(float));
  std::memcpy(d_b2, total.data() + R * X + R + 2 * X, 2 * sizeof(float));
}

// The backward of steps 1 .. T of a first-order meta-gradient, from ∂θ_T alone (nothing else of
// step T is used): per step t (index s = t − 1) the inputs step_backward takes, as arrays of T
// pointers; h[0] and c[0] may be null (the initial state, zeros: not read, and step 1 then skips
// what the forward skipped, h_0's products and σ(f), and the zero columns of its ∂W). Per block
// of coordinates it runs steps T .. 1 with each step's outgoing gradients (∂h_{t-1}, ∂c_{t-1},
// ∂θ_{t-1}, ∂logits_{t-1}) kept in the block's scratch as the next one's incoming; step 1 hands
// on only ∂θ_0 (h_0, c_0 and logits_0 are constants: their ∂h_0 = Wᵀ ∂z is not computed). Writes ∂θ_0 [n], each
// step's ∂W [T, 4H, 2 + H] and ∂b [T, 4H] (separate inputs per step), and ∂W2, ∂b2 summed over
// the steps in the order autograd adds T separate steps' (T first): the same numbers as T calls
// of metalstm_step_backward.
void metalstm_chain_backward(long n, long H, int threads, long T, const float* const* features,
                             const float* const* h, const float* const* c,
                             const float* const* theta, const float* const* prev_logits,
                             const float* const* grad, const float* const* W,
                             const float* const* b, const float* const* gates, const float* W2,
                             const float* d_theta_T, float* d_theta_0, float* d_W, float* d_b,
                             float* d_W2, float* d_b2) {
  const long X = 2 + H, R = 4 * H, blocks = blocks_of(n);
  const long per_block = R * X + R + 2 * X + 2;
  std::vector<float> partial(T * blocks * per_block);  // [T, blocks, per_block]
  float* const partial_sums = partial.data();
  // Scratch rows of a block: the step's inputs (features, h, c, θ, logits, g, gates), then two
  // sets of the gradients passed between steps (∂θ, ∂logits, ∂h, ∂c), incoming and outgoing.
  const long input_rows = 2 + 2 * H + 6, passed_rows = 3 + 2 * H;
  for_each_block(n, H, threads, [&](long blk, long j, long count, BlockSums& sums,
                                    std::vector<float>& buffer) {
    const long width = (count + L - 1) / L * L, pitch = width + L;
    float* const rows = aligned_scratch(buffer, (input_rows + 2 * passed_rows) * pitch);
    float *x = rows, *h_rows = x + 2 * pitch, *c_rows = h_rows + H * pitch;
    float *theta_row = c_rows + H * pitch, *logit_rows = theta_row + pitch;
    float *grad_row = logit_rows + 2 * pitch, *gate_rows = grad_row + pitch;
    float* incoming = gate_rows + 2 * pitch;
    float* outgoing = incoming + passed_rows * pitch;
    copy_rows(d_theta_T, 1, n, j, count, width, pitch, incoming);
    for (long s = T - 1; s >= 0; s--) {
      copy_rows(features[s], 2, n, j, count, width, pitch, x);
      if (h[s]) copy_rows(h[s], H, n, j, count, width, pitch, h_rows);
      if (c[s]) copy_rows(c[s], H, n, j, count, width, pitch, c_rows);
      copy_rows(theta[s], 1, n, j, count, width, pitch, theta_row);
      copy_rows(prev_logits[s], 2, n, j, count, width, pitch, logit_rows);
      copy_rows(grad[s], 1, n, j, count, width, pitch, grad_row);
      copy_rows(gates[s], 2, n, j, count, width, pitch, gate_rows);
      const bool last = s == T - 1;  // step T: only ∂θ_T comes in
      const bool first = s == 0;     // step 1: only ∂θ_0 goes out (h_0, c_0, logits_0 constants)
      const Rows in[B_NIN] = {{x, 2},
                              {h[s] ? h_rows : nullptr, H},
                              {c[s] ? c_rows : nullptr, H},
                              {theta_row, 1},
                              {logit_rows, 2},
                              {grad_row, 1},
                              {gate_rows, 2},
                              {incoming, 1},
                              {last ? nullptr : incoming + pitch, 2},
                              {last ? nullptr : incoming + 3 * pitch, H},
                              {last ? nullptr : incoming + (3 + H) * pitch, H},
                              {nullptr, 2}};
      const OutRows out[B_NOUT] = {{nullptr, 2},
                                   {first ? nullptr : outgoing + 3 * pitch, H},
                                   {first ? nullptr : outgoing + (3 + H) * pitch, H},
                                   {outgoing, 1},
                                   {first ? nullptr : outgoing + pitch, 2},
                                   {nullptr, 1}};
      const Params P{H, W[s], b[s], W2, nullptr};
      sums.clear();
      for_each_vector_pair(width, [&](auto V, long col) {
        backward_vector<V>(P, true, in, At{pitch, col}, out, At{pitch, col}, sums);
      });
      block_parameter_sums(H, sums, x, h[s] ? 2 + H : 2, pitch, width,
                           partial_sums + (s * blocks + blk) * per_block);
      std::swap(incoming, outgoing);
    }
    std::memcpy(d_theta_0 + j, incoming, count * sizeof(float));  // ∂θ_0: step 1's ∂θ_{t-1}
  });
  // Per step, the block sums in block order (as metalstm_step_backward); ∂W2 and ∂b2 then added
  // over the steps from T down, as autograd adds the T steps' as they arrive.
  std::vector<float> total(per_block);
  for (long s = T - 1; s >= 0; s--) {
    add_blocks(partial_sums + s * blocks * per_block, blocks, per_block, total.data());
    std::memcpy(d_W + s * R * X, total.data(), R * X * sizeof(float));
    std::memcpy(d_b + s * R, total.data() + R * X, R * sizeof(float));
    for (long k = 0; k < 2 * X; k++)
      d_W2[k] = s == T - 1 ? total[R * X + R + k] : d_W2[k] + total[R * X + R + k];
    for (long k = 0; k < 2; k++)
      d_b2[k] = s == T - 1 ? total[R * X + R + 2 * X + k] : d_b2[k] + total[R * X + R + 2 * X + k];
  }
}

}  // extern "C"
