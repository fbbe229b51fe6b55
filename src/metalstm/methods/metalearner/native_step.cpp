// The meta-learner's inner step (kernels.step_forward / kernels.step_backward) fused per
// coordinate: every quantity of a coordinate (its 2 + H inputs, 4H gate activations, cell, hidden
// state, gate logits and update) stays in registers or L1 while it is computed, instead of one
// pass over [H, n] tensors per operation. Same layout as the Python kernels: every tensor [r, n]
// row-major, coordinates contiguous; 16 coordinates per vector (GCC vector extensions: AVX-512,
// or two AVX2 halves). Built and loaded by native.py (optional: needs a C++ compiler).
//
// The forward writes nothing for the backward beyond the step's outputs: the backward computes
// layer 1's gate activations, c_t, tanh c_t and h_t again from the step's inputs. That is about
// 5,000 vector operations per 16 coordinates where reading back the 5H values per coordinate
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
#include <vector>
#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace {

typedef float vf __attribute__((vector_size(64)));  // 16 floats
typedef int vi __attribute__((vector_size(64)));
constexpr long L = 16;        // coordinates per vector
constexpr long BLOCK = 512;   // coordinates per block (threads' unit; reduction unit)
constexpr long MAX_H = 64;    // largest hidden size with a native kernel
// A step forward whose outputs take more bytes than this writes them with streaming stores
// (stream_row). On the AVX-512 Xeon, 8 Omniglot episodes at once (41 MB of outputs) gained
// 2-4 % with them, one evaluation episode of 64 filters (20 MB) lost as much: the next step found
// fewer of them in the cache.
constexpr long STREAM_BYTES = 32L << 20;
constexpr long PITCH = BLOCK + L;  // row stride of a block's scratch rows: not a multiple of
                                   // 4 KB, so one column's rows do not share a few cache sets

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
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

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

// The sum of a vector's 16 lanes, by halves (a fixed order: the same result on every run). On
// AVX-512 the halves are taken in registers (through memory, the 32-byte reloads of a 64-byte
// store could not be forwarded from it, a stall per sum).
inline float hsum(vf v) {
#if defined(__AVX512F__)
  const __m512 m = v;
  const __m256 high = _mm512_castps512_ps256(_mm512_shuffle_f32x4(m, m, 0xEE));  // lanes 8-15
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(m), high);
  const vf4 c = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
#else
  vf8 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  a += b;
  vf4 c, d;
  std::memcpy(&c, &a, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
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

// The 64-byte aligned start of a scratch buffer with room for `floats` (plus alignment).
float* aligned_scratch(std::vector<float>& buffer, long floats) {
  if (static_cast<long>(buffer.size()) < floats + L) buffer.resize(floats + L);
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

// dst[0 .. count) = src[0 .. count), on AVX-512 with streaming stores where dst is 64-byte
// aligned: they write whole lines to memory without reading them into the cache first (the
// forward's outputs are read again only at the next step, after the learner's passes have
// evicted them). The caller orders them with an sfence.
inline void stream_row(const float* src, long count, float* dst) {
#if defined(__AVX512F__)
  const auto address = reinterpret_cast<std::uintptr_t>(dst);
  const long to_line = static_cast<long>((64 - address % 64) % 64 / 4);  // floats
  const long head = address % 4 ? count : std::min(count, to_line);
  std::memcpy(dst, src, head * sizeof(float));
  long i = head;
  for (; i + L <= count; i += L) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  std::memcpy(dst + i, src + i, (count - i) * sizeof(float));
#else
  std::memcpy(dst, src, count * sizeof(float));
#endif
}

// Runs body(in, out, pitch, column) on every vector of the block of `count` coordinates that
// starts at column j of rows with stride `stride`, through a private copy: the block's rows are
// copied into `buffer` (row pitch a multiple of L plus L, zero-padded), and the outputs copied
// back (`stream`: with streaming stores, stream_row). The vector code then reads rows that
// are aligned, a known pitch apart and in L1/L2 (row strides of the whole tensors slowed it
// several-fold for some n), and needs no tail case.
template <long NI, long NO, class Body, class Finish>
void run_block(const Rows (&in)[NI], const OutRows (&out)[NO], long stride, long j, long count,
               std::vector<float>& buffer, bool stream, Body body, Finish finish) {
  const long width = (count + L - 1) / L * L, pitch = width + L;
  long total = 0;
  for (const Rows& r : in) total += r.p ? r.rows : 0;
  for (const OutRows& r : out) total += r.p ? r.rows : 0;
  float* next = aligned_scratch(buffer, total * pitch);
  Rows in_local[NI];
  OutRows out_local[NO];
  for (long t = 0; t < NI; t++) {
    in_local[t] = {in[t].p ? next : nullptr, in[t].rows};
    if (!in[t].p) continue;
    copy_rows(in[t].p, in[t].rows, stride, j, count, width, pitch, next);
    next += in[t].rows * pitch;
  }
  for (long t = 0; t < NO; t++) {
    out_local[t] = {out[t].p ? next : nullptr, out[t].rows};
    if (out[t].p) next += out[t].rows * pitch;
  }
  for (long c = 0; c < width; c += L) body(in_local, out_local, pitch, c);
  finish(in_local, pitch);
  for (long t = 0; t < NO; t++) {
    if (!out[t].p) continue;
    for (long r = 0; r < out[t].rows; r++) {
      const float* src = out_local[t].p + r * pitch;
      float* dst = out[t].p + r * stride + j;
      if (stream)
        stream_row(src, count, dst);
      else
        std::memcpy(dst, src, count * sizeof(float));
    }
  }
#if defined(__AVX512F__)
  if (stream) _mm_sfence();  // the streaming stores ordered before what follows
#endif
}

// -- forward --------------------------------------------------------------------------------------

enum FwdIn { F_FEATURES, F_H, F_C, F_THETA, F_PREV, F_GRAD, F_NIN };
enum FwdOut { F_THETA_NEW, F_LOGITS, F_H_NEW, F_C_NEW, F_GATES, F_NOUT };

struct Params {
  long H;
  const float *W, *b, *W2, *b2;  // [4H, 2 + H], [4H], [2, H + 2], [2]
};

// Layer 1's gate activations act = (σ(i), σ(f), σ(o), tanh(g)) = act(W x + b) [4H] of one vector
// of coordinates, from its input x = [features; h] [2 + H]: the pre-activations eight rows at a
// time (independent FMA chains), then four (4H is a multiple of 4). `width` = 2: h = 0 (the
// initial state), whose products add exact zeros and are skipped. `forget` false: σ(f) is not
// wanted (c_{t-1} = 0, where c_t = i ⊙ g) and is left uncomputed.
void layer1_gates(const Params& P, const vf* x, vf* act, long width, bool forget = true) {
  const long H = P.H, X = 2 + H, R = 4 * H;
  long r = 0;
  for (; r + 8 <= R; r += 8) {
    const float* w = P.W + r * X;
    vf a[8];
    for (long q = 0; q < 8; q++) a[q] = splat(P.b[r + q]);
    for (long k = 0; k < width; k++)
      for (long q = 0; q < 8; q++) a[q] += w[q * X + k] * x[k];
    for (long q = 0; q < 8; q++) act[r + q] = a[q];
  }
  for (; r < R; r += 4) {
    const float* w = P.W + r * X;
    vf a0 = splat(P.b[r]), a1 = splat(P.b[r + 1]), a2 = splat(P.b[r + 2]), a3 = splat(P.b[r + 3]);
    for (long k = 0; k < width; k++) {
      a0 += w[k] * x[k];
      a1 += w[X + k] * x[k];
      a2 += w[2 * X + k] * x[k];
      a3 += w[3 * X + k] * x[k];
    }
    act[r] = a0, act[r + 1] = a1, act[r + 2] = a2, act[r + 3] = a3;
  }
  for (long r = 0; r < H; r++) act[r] = vsigmoid(act[r]);                 // i
  for (long r = H; forget && r < 2 * H; r++) act[r] = vsigmoid(act[r]);  // f
  for (long r = 2 * H; r < 3 * H; r++) act[r] = vsigmoid(act[r]);         // o
  for (long r = 3 * H; r < R; r++) act[r] = vtanh(act[r]);                // g
}

// One vector of coordinates (columns j .. j + 15 of rows with stride s) through the whole step.
void forward_vector(const Params& P, const Rows (&in)[F_NIN], const OutRows (&out)[F_NOUT],
                    long s, long j) {
  // Local copies of the pointers: stores through float* cannot change them, so they
  // stay in registers.
  const float* ip[F_NIN];
  float* op[F_NOUT];
  for (long t = 0; t < F_NIN; t++) ip[t] = in[t].p;
  for (long t = 0; t < F_NOUT; t++) op[t] = out[t].p;
  const long H = P.H, X = 2 + H;
  vf x[2 + MAX_H], act[4 * MAX_H];
  for (long k = 0; k < 2; k++) x[k] = ld(ip[F_FEATURES] + k * s + j);
  for (long k = 0; ip[F_H] && k < H; k++) x[2 + k] = ld(ip[F_H] + k * s + j);
  layer1_gates(P, x, act, ip[F_H] ? X : 2, ip[F_C] != nullptr);
  // c_t = f ⊙ c_{t-1} + i ⊙ g (i ⊙ g alone for c_{t-1} = 0: the same number),
  // h_t = o ⊙ tanh c_t; layer 2's logits from h_t on the way.
  // Null h_t, c_t and logits outputs: not wanted (the inner loop's last step at evaluation).
  const bool state = op[F_H_NEW] != nullptr;
  vf l0 = splat(P.b2[0]), l1 = splat(P.b2[1]);
  for (long k = 0; k < H; k++) {
    vf cn = ip[F_C] ? act[H + k] * ld(ip[F_C] + k * s + j) + act[k] * act[3 * H + k]
                    : act[k] * act[3 * H + k];
    vf hn = act[2 * H + k] * vtanh(cn);
    if (state) {
      st(op[F_C_NEW] + k * s + j, cn);
      st(op[F_H_NEW] + k * s + j, hn);
    }
    l0 += P.W2[k] * hn;
    l1 += P.W2[X + k] * hn;
  }
  vf theta = ld(ip[F_THETA] + j);
  l0 += P.W2[H] * theta + P.W2[H + 1] * ld(ip[F_PREV] + j);
  l1 += P.W2[X + H] * theta + P.W2[X + H + 1] * ld(ip[F_PREV] + s + j);
  vf g0 = vsigmoid(l0), g1 = vsigmoid(l1);
  if (state) {
    st(op[F_LOGITS] + j, l0);
    st(op[F_LOGITS] + s + j, l1);
  }
  st(op[F_GATES] + j, g0);
  st(op[F_GATES] + s + j, g1);
  st(op[F_THETA_NEW] + j, g0 * theta - g1 * ld(ip[F_GRAD] + j));  // θ_t
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
  std::vector<float> dz;  // [4H, BLOCK], row stride PITCH
  long H;
  explicit BlockSums(long H) : d_b(4 * H), d_W2(2 * (H + 2)), d_b2(2), dz(4 * H * PITCH), H(H) {}
  void clear() {
    for (auto* v : {&d_b, &d_W2, &d_b2})
      for (vf& a : *v) a = vf{};
  }
};

// Rows k .. k + K − 1 of ∂x = Wᵀ ∂z for one vector (W's columns from `w`, row stride X): K
// independent FMA chains, each summed over r = 0 .. R − 1 in order; store(q, ∂x_{k+q}).
template <long K, class Store>
inline void input_gradient_rows(const float* w, long X, long R, const vf* dz, Store store) {
  vf a[K] = {};
  for (long r = 0; r < R; r++)
#pragma GCC unroll 8
    for (long q = 0; q < K; q++) a[q] += w[r * X + q] * dz[r];
#pragma GCC unroll 8
  for (long q = 0; q < K; q++) store(q, a[q]);
}

void backward_vector(const Params& P, bool need_params, const Rows (&in)[B_NIN],
                     const OutRows (&out)[B_NOUT], long s, long j, BlockSums& sums, long column) {
  // Local copies of the pointers: stores through float* cannot change them, so they
  // stay in registers.
  const float* ip[B_NIN];
  float* op[B_NOUT];
  for (long t = 0; t < B_NIN; t++) ip[t] = in[t].p;
  for (long t = 0; t < B_NOUT; t++) op[t] = out[t].p;
  vf* const sum_W2 = sums.d_W2.data();
  vf* const sum_b2 = sums.d_b2.data();
  vf* const sum_b = sums.d_b.data();
  float* const sum_dz = sums.dz.data();
  const long H = P.H, X = 2 + H, R = 4 * H;
  const float* W2 = P.W2;
  auto row = [&](BwdIn t, long r) { return ld(ip[t] + r * s + j); };
  // Layer 2: θ_t = σ(f) θ_{t-1} − σ(i) g_t; (f, i) = W2 [h_t, θ_{t-1}, logits_{t-1}] + b2.
  vf d_theta = row(B_D_THETA, 0), theta = row(B_THETA, 0), grad = row(B_GRAD, 0);
  vf g0 = row(B_GATES, 0), g1 = row(B_GATES, 1);
  vf dl0 = d_theta * theta, dl1 = -(d_theta * grad);
  if (ip[B_D_GATES]) dl0 += row(B_D_GATES, 0), dl1 += row(B_D_GATES, 1);
  dl0 *= g0 - g0 * g0;  // σ' = σ − σ²
  dl1 *= g1 - g1 * g1;
  if (ip[B_D_LOGITS]) dl0 += row(B_D_LOGITS, 0), dl1 += row(B_D_LOGITS, 1);
  st(op[B_D_THETA_PREV] + j, dl0 * W2[H] + dl1 * W2[X + H] + d_theta * g0);
  st(op[B_D_PREV_LOGITS] + j, dl0 * W2[H + 1]);
  st(op[B_D_PREV_LOGITS] + s + j, dl1 * W2[X + H + 1]);
  if (op[B_D_GRAD]) st(op[B_D_GRAD] + j, -(d_theta * g1));
  if (need_params) {
    vf p0 = row(B_PREV, 0), p1 = row(B_PREV, 1);
    sum_W2[H] += dl0 * theta, sum_W2[X + H] += dl1 * theta;
    sum_W2[H + 1] += dl0 * p0, sum_W2[X + H + 1] += dl1 * p1;
    sum_b2[0] += dl0, sum_b2[1] += dl1;
  }
  // Layer 1: h_t = o ⊙ tanh c_t, c_t = f ⊙ c_{t-1} + i ⊙ g, (i, f, o, g) = act(W x + b),
  // computed again from the step's inputs (x = [features; h], c_{t-1}).
  vf x[2 + MAX_H], act[4 * MAX_H], dz[4 * MAX_H];
  for (long k = 0; k < 2; k++) x[k] = row(B_FEATURES, k);
  for (long k = 0; k < H; k++) x[2 + k] = row(B_H, k);
  layer1_gates(P, x, act, X);
  for (long k = 0; k < H; k++) {
    vf i = act[k], f = act[H + k], o = act[2 * H + k], g = act[3 * H + k], c = row(B_C, k);
    vf tc = vtanh(f * c + i * g);  // tanh c_t
    if (need_params) {             // layer 2 read h_t = o ⊙ tanh c_t
      vf hn = o * tc;
      sum_W2[k] += dl0 * hn;
      sum_W2[X + k] += dl1 * hn;
    }
    vf d_hn = W2[k] * dl0 + W2[X + k] * dl1;
    if (ip[B_D_H]) d_hn += row(B_D_H, k);
    vf d_cn = d_hn * o * (1.0f - tc * tc);
    if (ip[B_D_C]) d_cn += row(B_D_C, k);
    dz[k] = d_cn * g * (i - i * i);
    dz[H + k] = d_cn * c * (f - f * f);
    dz[2 * H + k] = d_hn * tc * (o - o * o);
    dz[3 * H + k] = d_cn * i * (1.0f - g * g);
    st(op[B_D_C_PREV] + k * s + j, d_cn * f);
  }
  if (need_params) {
    for (long r = 0; r < R; r++) {
      sum_b[r] += dz[r];
      st(sum_dz + r * PITCH + column, dz[r]);
    }
  }
  // ∂x = Wᵀ ∂z, eight input rows at a time (eight FMA chains over r), then four, then one;
  // rows 0, 1 (the gradient's features) when asked.
  const long first = op[B_D_FEATURES] ? 0 : 2;
  auto store_dx = [&](long k, vf v) {
    if (k < 2)
      st(op[B_D_FEATURES] + k * s + j, v);
    else
      st(op[B_D_H_PREV] + (k - 2) * s + j, v);
  };
  auto store_from = [&](long k) { return [&, k](long q, vf v) { store_dx(k + q, v); }; };
  long k = first;
  for (; k + 8 <= X; k += 8) input_gradient_rows<8>(P.W + k, X, R, dz, store_from(k));
  for (; k + 4 <= X; k += 4) input_gradient_rows<4>(P.W + k, X, R, dz, store_from(k));
  for (; k < X; k++) input_gradient_rows<1>(P.W + k, X, R, dz, store_from(k));
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

void block_weight_gradient(long H, const BlockSums& sums, const float* x_rows, long pitch,
                           long columns, float* d_W) {
  const long X = 2 + H, R = 4 * H;
  for (long r = 0; r < R; r += 4) {
    const float* dz = sums.dz.data() + r * PITCH;
    long k = 0;
    for (; k + 4 <= X; k += 4)
      weight_gradient_tile<4>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
    for (; k + 2 <= X; k += 2)
      weight_gradient_tile<2>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
    for (; k < X; k++)
      weight_gradient_tile<1>(X, dz, x_rows + k * pitch, pitch, columns, d_W + r * X + k);
  }
}

long blocks_of(long n) { return (n + BLOCK - 1) / BLOCK; }

// The per-block parameter sums of one step's backward (∂W, ∂b, ∂W2, ∂b2, `per_block` floats),
// from a block's BlockSums and its copy of layer 1's input rows x = [features; h].
void block_parameter_sums(long H, const BlockSums& sums, const float* x_rows, long pitch,
                          long columns, float* part) {
  const long X = 2 + H, R = 4 * H;
  block_weight_gradient(H, sums, x_rows, pitch, columns, part);
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
                [&](auto& i, auto& o, long pitch, long column) {
                  forward_vector(P, i, o, pitch, column);
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
        [&](auto& i, auto& o, long pitch, long column) {
          backward_vector(P, need_params, i, o, pitch, column, sums, column);
        },
        [&](auto& i, long pitch) {  // the block's parameter gradients, from its copy of x
          if (need_params)
            block_parameter_sums(H, sums, i[B_FEATURES].p, pitch, columns,
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
// pointers; h[0] and c[0] may be null (the initial state, zeros). Per block of coordinates it
// runs steps T .. 1 with each step's outgoing gradients (∂h_{t-1}, ∂c_{t-1}, ∂θ_{t-1},
// ∂logits_{t-1}) kept in the block's scratch as the next one's incoming. Writes ∂θ_0 [n], each
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
      copy_rows(h[s], H, n, j, count, width, pitch, h_rows);
      copy_rows(c[s], H, n, j, count, width, pitch, c_rows);
      copy_rows(theta[s], 1, n, j, count, width, pitch, theta_row);
      copy_rows(prev_logits[s], 2, n, j, count, width, pitch, logit_rows);
      copy_rows(grad[s], 1, n, j, count, width, pitch, grad_row);
      copy_rows(gates[s], 2, n, j, count, width, pitch, gate_rows);
      const bool last = s == T - 1;  // step T: only ∂θ_T comes in
      const Rows in[B_NIN] = {{x, 2},
                              {h_rows, H},
                              {c_rows, H},
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
                                   {outgoing + 3 * pitch, H},
                                   {outgoing + (3 + H) * pitch, H},
                                   {outgoing, 1},
                                   {outgoing + pitch, 2},
                                   {nullptr, 1}};
      const Params P{H, W[s], b[s], W2, nullptr};
      sums.clear();
      for (long col = 0; col < width; col += L)
        backward_vector(P, true, in, out, pitch, col, sums, col);
      block_parameter_sums(H, sums, x, pitch, width,
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
