// The learner block's batch norm, 2x2 max-pool and ReLU as one forward and one backward over
// channels-last tensors: with the batch's own statistics (layers.batch_norm_pool_relu) or with
// given ones (running statistics: a null `extremes`, layers.normalise_pool_relu). The PyTorch
// composition makes about ten passes over the [B, C, H, W] activations each way (statistics,
// centring, squares, normalisation, pooling with int64 indices, ReLU, then the zero-filled
// max-pool gradient and batch norm's backward). Here, with the batch's statistics, the forward
// reads x once: the sums for mean and variance, and each window's input at its maximum (its
// extreme: the normalisation is monotone, so it is known before the statistics are), a quarter
// of x written for the backward; a pass over the extremes then writes the pooled output. The
// backward takes its sums from the extremes and ∂out, then reads x once for ∂x, finding each
// window's maximum again rather than storing its position. With given statistics each reads x
// once: no statistics to sum forward, and ∂x, which does not depend on the sums then, written
// in the same pass as them. A first block (1-4 input channels: an image's) computes its 3x3
// convolution inside its passes (FirstConv; metalstm_conv_block_forward and _backward,
// layers.conv_batch_norm_pool_relu and conv_normalise_pool_relu): its [B, H, W, C] output is
// never written, computed once forward and once back, where ∂x is taken into the
// convolution's weight gradient instead of being written.
// Built and loaded by metalstm/native.py (optional: needs a C++ compiler).
//
// Layout: x [B, H, W, C] (NHWC, channels contiguous, C a multiple of 8), pooled tensors
// [B, H/2, W/2, C]; a window's first maximum in PyTorch's scan order (row by row) wins, as in
// PyTorch's max-pool, and rows or columns left over by an odd side belong to no window
// (PyTorch's floor mode).
//
// Determinism: every sum over pixels is taken in double, per block of about ROWS pixels (the
// forward's statistics: in float per row pair first), and the block sums added in block order,
// so the results do not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(32)));   // 8 channels
typedef int vi __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(64)));  // the same 8 channels in double

constexpr long LANES = 8;
constexpr long MAX_VECTORS = 64;  // channels up to 512 (the Python side checks C % 8 == 0)
constexpr long ROWS = 256;        // pixels per block of a sum (threads' unit; reduction unit)

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vd wide(vf v) { return __builtin_convertvector(v, vd); }

typedef float vf2 __attribute__((vector_size(64)));  // two vectors of 8 channels
inline vf2 ld2(const void* p) { vf2 v; std::memcpy(&v, p, sizeof v); return v; }
inline void st2(float* p, vf2 v) { std::memcpy(p, &v, sizeof v); }

// Per-channel constants of the normalisation y = (x − μ) k + β, as vectors.
struct Affine {
  vf mu[MAX_VECTORS], k[MAX_VECTORS], beta[MAX_VECTORS];
};

// One 2x2 window of vectors T of channels (8: vf, or 16: vf2) normalised by y = (x − μ) k + β:
// the normalised values' first maximum (PyTorch's max-pool: a later value wins if greater, or
// NaN), its position 0..3 and the four inputs.
template <class T>
struct WindowOf {
  typedef decltype(T{} < T{}) Mask;  // the integer vector of T's lanes
  T best;
  Mask at;
  T x[4];

  WindowOf(const T (&in)[4], T mu, T k, T beta) {
    for (int q = 0; q < 4; q++) x[q] = in[q];
    best = (x[0] - mu) * k + beta;
    at = Mask{} + 0;
    for (int q = 1; q < 4; q++) {
      const T y = (x[q] - mu) * k + beta;
      const Mask wins = (y > best) | (y != y);
      best = wins ? y : best;
      at = wins ? Mask{} + q : at;
    }
  }

  // The input at the maximum.
  T x_at() const {
    T value = x[0];
    for (int q = 1; q < 4; q++) value = at == q ? x[q] : value;
    return value;
  }
};
typedef WindowOf<vf> Window;

// The window at channel vector v.
inline Window window(const vf (&x)[4], long v, const Affine& A) {
  return Window(x, A.mu[v], A.k[v], A.beta[v]);
}

// The same for the window whose four pixels' channels start at p[0..3].
inline Window window(const float* const (&p)[4], long v, const Affine& A) {
  const long c = v * LANES;
  const vf x[4] = {ld(p[0] + c), ld(p[1] + c), ld(p[2] + c), ld(p[3] + c)};
  return window(x, v, A);
}

// ReLU(window(x, v, A).best) for channel vectors v and v + 1 at once: the same operations, on 16
// lanes (the forward's output, for a window whose four inputs are in registers).
inline vf2 pooled_relu(const vf2 (&x)[4], long v, const Affine& A) {
  const vf2 best = WindowOf<vf2>(x, ld2(&A.mu[v]), ld2(&A.k[v]), ld2(&A.beta[v])).best;
  return best <= 0.0f ? vf2{} : best;  // ReLU (NaN stays NaN)
}

// The four pixels of window (b, i, j) of x [B, H, W, C].
struct Pixels {
  long H, W, C;
  void of(const float* x, long b, long i, long j, const float* (&p)[4]) const {
    const float* top = x + ((b * H + 2 * i) * W + 2 * j) * C;
    p[0] = top, p[1] = top + C, p[2] = top + W * C, p[3] = top + (W + 1) * C;
  }
};

// Window r = (b · Ho + i) · Wo + j of an [B, Ho, Wo] grid, followed from one window to the next
// by counting (integer divisions, tens of cycles each, once per run of windows only).
struct WindowCursor {
  long Ho, Wo, b, i, j;
  WindowCursor(long Ho, long Wo, long r)
      : Ho(Ho), Wo(Wo), b(r / (Ho * Wo)), i(r / Wo % Ho), j(r % Wo) {}
  void next() {
    if (++j < Wo) return;
    j = 0;
    if (++i < Ho) return;
    i = 0, b++;
  }
};

// total[0 .. width) = Σ over rows r of the vectors f(first, last, acc) adds into
// acc[0 .. width / 8) for rows first .. last − 1 in order, in double: blocks of `per_block` rows
// summed in parallel, then added in block order.
template <class F>
void channel_sums(long rows, long width, int threads, F f, double* total, long per_block = ROWS) {
  const long blocks = (rows + per_block - 1) / per_block, vectors = width / LANES;
  std::vector<double> partial(blocks * width);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long blk = 0; blk < blocks; blk++) {
    vd acc[2 * MAX_VECTORS] = {};
    f(blk * per_block, std::min(rows, (blk + 1) * per_block), acc);
    std::memcpy(partial.data() + blk * width, acc, vectors * sizeof(vd));
  }
  std::fill(total, total + width, 0.0);
  for (long blk = 0; blk < blocks; blk++)
    for (long c = 0; c < width; c++) total[c] += partial[blk * width + c];
}

// The mean, biased variance σ² [C] and 1 / sqrt(σ² + ε) of `pixels` values per channel from
// their sums about K = `shift` (Σ (x − K): sums[0 .. C), Σ (x − K)²: sums[C .. 2C)), in double.
void moments(long pixels, long C, const vd* shift, const double* sums, float eps, float* mean,
             float* var, float* invstd) {
  for (long c = 0; c < C; c++) {
    const double d = sums[c] / pixels, v = std::max(sums[C + c] / pixels - d * d, 0.0);
    mean[c] = static_cast<float>(shift[c / LANES][c % LANES] + d);
    var[c] = static_cast<float>(v);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(v + eps));
  }
}

// 1 / sqrt(σ² + ε) [C] of given variances var [C], in double.
std::vector<float> inverse_deviations(long C, const float* var, float eps) {
  std::vector<float> invstd(C);
  for (long c = 0; c < C; c++)
    invstd[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
  return invstd;
}

// The backward's ∂β, ∂γ [C] from the sums Σ ∂y (sums[0 .. C)) and Σ ∂y (x − μ) (sums[C .. 2C))
// over `pixels` values per channel, and the vectors a = −k mean(∂y), s = −k / σ mean(∂y x̂) of
// ∂x = k ∂y + a + s (x − μ) (Ioffe & Szegedy 2015; given statistics: a = s = 0).
void backward_coefficients(long C, long pixels, const double* sums, const float* invstd,
                           const Affine& A, bool given, float* d_gamma, float* d_beta, vf* a,
                           vf* s) {
  for (long c = 0; c < C; c++) {
    d_beta[c] = static_cast<float>(sums[c]);
    d_gamma[c] = static_cast<float>(sums[C + c]) * invstd[c];
    const float k = given ? 0.0f : A.k[c / LANES][c % LANES];
    a[c / LANES][c % LANES] = -k * d_beta[c] / pixels;
    s[c / LANES][c % LANES] = -k * invstd[c] * d_gamma[c] / pixels;
  }
}

// Each window's output at the maximum of its normalised values (y − μ) k + β, found before the
// statistics are known: the normalisation is monotone in y, its rounding too, so that maximum is
// at the window's largest value where γ > 0, its smallest where γ < 0, and its first where γ = 0
// (all equal); a NaN wins, as in WindowOf. `sign`: sign_of(γ) for the window's channels.
template <class T>
T extreme(const T (&y)[4], T sign) {
  T best = y[0];
  for (int q = 1; q < 4; q++) best = (sign * y[q] > sign * best) | (y[q] != y[q]) ? y[q] : best;
  return best;
}

// +1 where γ > 0, −1 where γ < 0, 0 elsewhere (0 or NaN), per channel: extreme's `sign`.
void signs_of(long C, const float* gamma, vf* sign) {
  for (long c = 0; c < C; c++)
    sign[c / LANES][c % LANES] = gamma[c] > 0.0f ? 1.0f : gamma[c] < 0.0f ? -1.0f : 0.0f;
}

// Blocks of row pairs for the sums of a pass by windows: about ROWS pixels each.
long row_pairs_per_block(long W) { return std::max(1L, ROWS / (2 * W)); }

// The batch's mean, biased variance and 1 / sqrt(σ² + ε) [C] of x [B, H, W, C] (sums of x − K for
// K = the first pixel's values: no cancellation to speak of in double when the mean is far from
// 0; the variance in double), and each window's extreme, extremes
// [B, H/2, W/2, C], in one pass over x: row pairs (b, i) in order, per pair its windows' four
// pixels, then a pixel of an odd last column (an odd last row is a pair of its own), the sums in
// float per row pair, those added in double in blocks of about ROWS pixels.
void statistics_and_extremes(long B, long H, long W, long C, int threads, const float* x,
                             const float* gamma, float eps, float* mean, float* var,
                             float* invstd, float* extremes) {
  const long V = C / LANES, Ho = H / 2, Wo = W / 2, row_pairs = (H + 1) / 2;
  vf base[MAX_VECTORS], sign[MAX_VECTORS];
  vd shift[MAX_VECTORS];
  for (long v = 0; v < V; v++) base[v] = ld(x + v * LANES), shift[v] = wide(base[v]);
  signs_of(C, gamma, sign);
  const Pixels px{H, W, C};
  std::vector<double> sums(2 * C);
  channel_sums(B * row_pairs, 2 * C, threads, [&](long first, long last, vd* acc) {
    for (long row = first; row < last; row++) {
      const long b = row / row_pairs, i = row % row_pairs;  // rows 2i and 2i + 1 of image b
      vf sum[MAX_VECTORS] = {}, square[MAX_VECTORS] = {};
      for (long j = 0; i < Ho && j < Wo; j++) {
        const float* p[4];
        px.of(x, b, i, j, p);
        float* e = extremes + ((b * Ho + i) * Wo + j) * C;
        for (long v = 0; v < V; v++) {
          const vf y[4] = {ld(p[0] + v * LANES), ld(p[1] + v * LANES), ld(p[2] + v * LANES),
                           ld(p[3] + v * LANES)};
          vf d[4];  // the window's sums first: one update of the row pair's per window
          for (int q = 0; q < 4; q++) d[q] = y[q] - base[v];
          sum[v] += (d[0] + d[1]) + (d[2] + d[3]);
          square[v] += (d[0] * d[0] + d[1] * d[1]) + (d[2] * d[2] + d[3] * d[3]);
          st(e + v * LANES, extreme(y, sign[v]));
        }
      }
      for (long h = 2 * i; h < std::min(H, 2 * i + 2); h++)
        for (long w = i < Ho ? 2 * Wo : 0; w < W; w++)  // pixels in no window
          for (long v = 0; v < V; v++) {
            const vf d = ld(x + ((b * H + h) * W + w) * C + v * LANES) - base[v];
            sum[v] += d;
            square[v] += d * d;
          }
      for (long v = 0; v < V; v++) acc[v] += wide(sum[v]), acc[V + v] += wide(square[v]);
    }
  }, sums.data(), row_pairs_per_block(W));
  moments(B * H * W, C, shift, sums.data(), eps, mean, var, invstd);
}

// ReLU((e − μ) k + β) of each window's extreme e: out [B, H/2, W/2, C], the forward's output.
void pool_relu_of_extremes(long windows, long C, int threads, const Affine& A,
                           const float* extremes, float* out) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < windows; r++)
    for (long v = 0; v < C / LANES; v++) {
      const vf best = (ld(extremes + r * C + v * LANES) - A.mu[v]) * A.k[v] + A.beta[v];
      st(out + r * C + v * LANES, best <= 0.0f ? vf{} : best);  // ReLU (NaN stays NaN)
    }
}

// The backward's sums Σ ∂y and Σ ∂y (x − μ) per channel (sums[0 .. C) and [C .. 2C)) over the
// windows, x at each window's maximum: its extreme, from the forward; ∂y = ∂out where the ReLU
// is on, else 0.
std::vector<double> extreme_sums(long windows, long C, int threads, const float* extremes,
                                 const float* d_out, const Affine& A) {
  const long V = C / LANES;
  std::vector<double> sums(2 * C);
  channel_sums(windows, 2 * C, threads, [&](long first, long last, vd* acc) {
    for (long r = first; r < last; r++)
      for (long v = 0; v < V; v++) {
        const vf centred = ld(extremes + r * C + v * LANES) - A.mu[v];
        const vd dy = wide(centred * A.k[v] + A.beta[v] > 0.0f ? ld(d_out + r * C + v * LANES)
                                                               : vf{});
        acc[v] += dy;
        acc[V + v] += dy * wide(centred);
      }
  }, sums.data());
  return sums;
}

// Where the CPU lacks AVX-512 the fused first block is never run (metalstm_block_fuses_conv), only
// tested: its code is built at -O2 there, where -O3 took a minute to compile on a Zen 3 EPYC
// (GCC splitting every 64-byte vector into two) for a library otherwise built in a few seconds.
#if !defined(__AVX512F__)
#pragma GCC push_options
#pragma GCC optimize("O2")
#endif

// A first block's 3x3 convolution (padding 1, stride 1, no bias) of x [B, H, W, G·Cin] (NHWC) by
// weight [C, Cin, 3, 3] in G groups, computed where it is needed rather than written out: for
// the few input channels of a first block (an image's 1 or 3) it is a few multiply-adds per
// output, and writing its [B, H, W, C] output and reading it back in every pass cost more.
// Each output sums its taps in the order kh, kw, ci, one fused multiply-add each, over a
// zero-padded copy of x (oneDNN sums a single channel's taps in the order kw, kh: the two differ
// in the last bit of some outputs). Channels go K pairs of vectors (16 K channels) at a time, so
// that each weight vector loaded serves a window's four pixels and each input value K pairs;
// C / G is a multiple of 16 K, so they lie in one group.
template <int CIN, int K>
struct FirstConv {
  long B, H, W, C, G, Hp, Wp, Cx;
  std::unique_ptr<float[]> padded;  // x [B, H + 2, W + 2, G·Cin] with a border of zeros
  std::vector<float> taps;          // [kh, kw, ci, C]: a tap's weights for every channel
  std::vector<long> start;          // [C / 8]: channel vector v's group's first input channel
                                    // (a table, not a division in every call of input())

  FirstConv(long B, long H, long W, long C, long G, int threads, const float* x,
            const float* weight)
      : B(B), H(H), W(W), C(C), G(G), Hp(H + 2), Wp(W + 2), Cx(G * CIN),
        padded(new float[B * (H + 2) * (W + 2) * G * CIN]), taps(9 * CIN * C),
        start(C / LANES) {
    for (long v = 0; v < C / LANES; v++) start[v] = v * LANES / (C / G) * CIN;  // group · Cin
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
      float* image = padded.get() + b * Hp * Wp * Cx;
      std::fill(image, image + Wp * Cx, 0.0f);
      for (long h = 0; h < H; h++) {
        float* row = image + (h + 1) * Wp * Cx;
        std::fill(row, row + Cx, 0.0f);
        std::memcpy(row + Cx, x + (b * H + h) * W * Cx, W * Cx * sizeof(float));
        std::fill(row + (W + 1) * Cx, row + Wp * Cx, 0.0f);
      }
      std::fill(image + (H + 1) * Wp * Cx, image + Hp * Wp * Cx, 0.0f);
    }
    for (long c = 0; c < C; c++)
      for (long ci = 0; ci < CIN; ci++)
        for (long t = 0; t < 9; t++) taps[(t * CIN + ci) * C + c] = weight[(c * CIN + ci) * 9 + t];
  }

  // The padded input of pixel (b, h, w)'s tap (0, 0), at the group of channel vector v.
  const float* input(long b, long h, long w, long v) const {
    return padded.get() + ((b * Hp + h) * Wp + w) * Cx + start[v];
  }

  // y[q][k]: the outputs of channel vectors v + 2k, v + 2k + 1 at the pixels q = (dy, dx) of
  // (h + dy, w + dx) for dy < DY, dx < DX (a window's four: DY = DX = 2; one pixel: 1, 1).
  template <int DY, int DX>
  void outputs(long b, long h, long w, long v, vf2 (&y)[DY * DX][K]) const {
    const float* xs = input(b, h, w, v);
    const float* ws = taps.data() + v * LANES;
    for (int q = 0; q < DY * DX; q++)
      for (int k = 0; k < K; k++) y[q][k] = vf2{};
    for (int kh = 0; kh < 3; kh++)
      for (int kw = 0; kw < 3; kw++)
        for (int ci = 0; ci < CIN; ci++) {
          vf2 wt[K];
          for (int k = 0; k < K; k++) wt[k] = ld2(ws + ((kh * 3 + kw) * CIN + ci) * C + k * 16);
          for (int q = 0; q < DY * DX; q++) {
            const float xv = xs[((kh + q / DX) * Wp + kw + q % DX) * Cx + ci];
            for (int k = 0; k < K; k++) y[q][k] += wt[k] * xv;
          }
        }
  }

  // dw [kh, kw, ci, C] += Σ over the W·R pixels (h + r, w), r < R, of ∂y[r][w][c] times the
  // pixel's inputs, for the channels of vectors v .. v + 2K − 1 (∂y [R, W, 16K]: those channels
  // only): taps in blocks whose sums over the pixels stay in registers.
  template <int R>
  void add_weight_gradient(long b, long h, long v, const float* dy, float* dw) const {
    constexpr int J = K <= 2 ? 9 : 3;  // taps per block (dividing 9 CIN): J x K accumulators
    constexpr long P = 2 * K * LANES;  // ∂y's floats per pixel: these channels only
    for (int t0 = 0; t0 < 9 * CIN; t0 += J) {
      vf2 acc[J][K] = {};
      for (int r = 0; r < R; r++) {
        const float* xs = input(b, h + r, 0, v);
        const float* ds = dy + r * W * P;
        for (long w = 0; w < W; w++, xs += Cx, ds += P) {
          vf2 d[K];
          for (int k = 0; k < K; k++) d[k] = ld2(ds + k * 16);
          for (int jj = 0; jj < J; jj++) {
            const int t = t0 + jj, tap = t / CIN, ci = t % CIN;
            const float xv = xs[((tap / 3) * Wp + tap % 3) * Cx + ci];
            for (int k = 0; k < K; k++) acc[jj][k] += d[k] * xv;
          }
        }
      }
      for (int jj = 0; jj < J; jj++)
        for (int k = 0; k < K; k++) {
          float* out = dw + (t0 + jj) * C + v * LANES + k * 16;
          st2(out, ld2(out) + acc[jj][k]);
        }
    }
  }
};

// The 8 channels of vector u of a pair of channel vectors whose first is even.
inline vf half(vf2 y, long u) {
  return u % 2 ? __builtin_shufflevector(y, y, 8, 9, 10, 11, 12, 13, 14, 15)
               : __builtin_shufflevector(y, y, 0, 1, 2, 3, 4, 5, 6, 7);
}

// The affine map y = (x − μ) k + β of channel statistics μ, 1 / sqrt(σ² + ε) and γ, β.
Affine affine(long C, const float* mean, const float* invstd, const float* gamma,
              const float* beta) {
  Affine A;
  for (long c = 0; c < C; c++) {
    A.mu[c / LANES][c % LANES] = mean[c];
    A.k[c / LANES][c % LANES] = gamma[c] * invstd[c];
    A.beta[c / LANES][c % LANES] = beta[c];
  }
  return A;
}

// ReLU(max-pool(A(conv))) of every window: out [B, H/2, W/2, C].
template <int CIN, int K>
void conv_pool_relu(const FirstConv<CIN, K>& conv, int threads, const Affine& A, float* out) {
  const long Ho = conv.H / 2, Wo = conv.W / 2, C = conv.C;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (long b = 0; b < conv.B; b++)
    for (long i = 0; i < Ho; i++)
      for (long j = 0; j < Wo; j++) {
        float* o = out + ((b * Ho + i) * Wo + j) * C;
        for (long v = 0; v < C / LANES; v += 2 * K) {
          vf2 y[4][K];
          conv.template outputs<2, 2>(b, 2 * i, 2 * j, v, y);
          for (int k = 0; k < K; k++) {
            const vf2 x[4] = {y[0][k], y[1][k], y[2][k], y[3][k]};
            st2(o + (v + 2 * k) * LANES, pooled_relu(x, v + 2 * k, A));
          }
        }
      }
}

// The first pass of a first block's forward with the batch's statistics, as
// statistics_and_extremes takes it of x: the convolution's outputs, computed once, give the
// batch's statistics and each window's extreme, extremes [B, H/2, W/2, C], the sums in the same
// order (row pairs in order; the windows' pixels, then those in no window).
template <int CIN, int K>
void conv_statistics_and_extremes(const FirstConv<CIN, K>& conv, int threads,
                                  const float* gamma, float eps, float* mean, float* var,
                                  float* invstd, float* extremes) {
  const long B = conv.B, H = conv.H, W = conv.W, C = conv.C, V = C / LANES;
  const long Ho = H / 2, Wo = W / 2, row_pairs = (H + 1) / 2;
  vf2 base[MAX_VECTORS / 2];  // the first pixel's outputs: the sums' shift
  vd shift[MAX_VECTORS];
  for (long v = 0; v < V; v += 2 * K) {
    vf2 y[1][K];
    conv.template outputs<1, 1>(0, 0, 0, v, y);
    for (int k = 0; k < K; k++) base[v / 2 + k] = y[0][k];
    for (long u = v; u < v + 2 * K; u++) shift[u] = wide(half(y[0][(u - v) / 2], u));
  }
  vf sign[MAX_VECTORS];
  signs_of(C, gamma, sign);
  std::vector<double> sums(2 * C);
  channel_sums(B * row_pairs, 2 * C, threads, [&](long first, long last, vd* acc) {
    for (long row = first; row < last; row++) {
      const long b = row / row_pairs, i = row % row_pairs;  // rows 2i and 2i + 1 of image b
      for (long v = 0; v < V; v += 2 * K) {
        // the row pair's sums in float (a few hundred values each), then added in double
        vf2 sum[K] = {}, square[K] = {};
        auto add = [&](const auto& y, int pixels) {
          for (int q = 0; q < pixels; q++)
            for (int k = 0; k < K; k++) {
              const vf2 d = y[q][k] - base[v / 2 + k];
              sum[k] += d;
              square[k] += d * d;
            }
        };
        for (long j = 0; i < Ho && j < Wo; j++) {
          vf2 y[4][K];
          conv.template outputs<2, 2>(b, 2 * i, 2 * j, v, y);
          add(y, 4);
          float* e = extremes + ((b * Ho + i) * Wo + j) * C + v * LANES;
          for (int k = 0; k < K; k++) {
            const vf2 window[4] = {y[0][k], y[1][k], y[2][k], y[3][k]};
            st2(e + 2 * k * LANES, extreme(window, ld2(&sign[v + 2 * k])));
          }
        }
        for (long h = 2 * i; h < std::min(H, 2 * i + 2); h++)
          for (long w = i < Ho ? 2 * Wo : 0; w < W; w++) {  // pixels in no window
            vf2 y[1][K];
            conv.template outputs<1, 1>(b, h, w, v, y);
            add(y, 1);
          }
        for (long u = v; u < v + 2 * K; u++) {
          acc[u] += wide(half(sum[(u - v) / 2], u));
          acc[V + u] += wide(half(square[(u - v) / 2], u));
        }
      }
    }
  }, sums.data(), row_pairs_per_block(W));
  moments(B * H * W, C, shift, sums.data(), eps, mean, var, invstd);
}

// Pieces of a first block's weight gradient: rows of windows (b, i) cut into pieces fixed by the
// shape alone (about PIECE_WORK multiply-adds each, at most MAX_GRADIENT_PIECES), each piece's
// sums taken in float on whichever thread gets it, the pieces then added in order in double:
// the same bits for any thread count. (A piece per row pair made adding the pieces a third of
// the backward of 8 episodes' 5 support images at 28x28.)
constexpr long MAX_GRADIENT_PIECES = 128;
constexpr double PIECE_WORK = 1 << 21;  // multiply-adds a piece should hold at least (adding
                                        // a piece's sums costs about one of its rows' work)

// The first block's backward with the batch's statistics, as metalstm_block_backward computes
// it from x = the convolution's outputs: its sums from the forward's extremes (each window's
// output at its maximum), then ∂x from the outputs computed again; instead of ∂x, the
// convolution's weight gradient dW [C, Cin, 3, 3] from the ∂x each pixel gets.
template <int CIN, int K>
void conv_block_backward(const FirstConv<CIN, K>& conv, int threads, const float* extremes,
                         const float* d_out, const float* gamma, const float* beta,
                         const float* mean, const float* var, float eps, float* d_weight,
                         float* d_gamma, float* d_beta) {
  const long B = conv.B, H = conv.H, W = conv.W, C = conv.C, V = C / LANES;
  const long Ho = H / 2, Wo = W / 2, pixels = B * H * W;
  const std::vector<float> invstd = inverse_deviations(C, var, eps);
  const Affine A = affine(C, mean, invstd.data(), gamma, beta);
  // window (b, i, j)'s k-th pair of channel vectors from v, its maximum found again as the
  // forward found it, and ∂y there (0 where the ReLU is off; d: the window's ∂out)
  auto at_maximum = [&](const vf2 (&y)[4][K], long v, int k, const float* d, vf2& dy) {
    const long u = v + 2 * k;
    const vf2 x[4] = {y[0][k], y[1][k], y[2][k], y[3][k]};
    const WindowOf<vf2> win(x, ld2(&A.mu[u]), ld2(&A.k[u]), ld2(&A.beta[u]));
    dy = win.best > 0.0f ? ld2(d + u * LANES) : vf2{};
    return win;
  };
  const std::vector<double> sums = extreme_sums(B * Ho * Wo, C, threads, extremes, d_out, A);
  // ∂x = k ∂y + a + s (x − μ) at each pixel of the convolution's output (as
  // metalstm_block_backward computes it), row pair by row pair, then into dW
  vf a[MAX_VECTORS], s[MAX_VECTORS];
  backward_coefficients(C, pixels, sums.data(), invstd.data(), A, false, d_gamma, d_beta, a, s);
  const long row_pairs = (H + 1) / 2, rows = B * row_pairs;
  const long width = 9 * CIN * C;
  const double work = double(B) * H * W * width;  // the weight gradient's multiply-adds
  const long pieces = std::clamp(long(std::ceil(work / PIECE_WORK)), 1L,
                                 std::min(rows, MAX_GRADIENT_PIECES));
  const std::unique_ptr<float[]> partial(new float[pieces * width]);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (long piece = 0; piece < pieces; piece++) {
      float* dw = partial.get() + piece * width;
      std::fill(dw, dw + width, 0.0f);
      // ∂x of the row pair [2, W, 16K] for one block of channel vectors at a time, taken into
      // their weights' gradient at once: written and read in L1 (all C channels of a row pair,
      // [2, W, C], were 172 KB at 84x84 for 8 episodes, and its stores missed the cache)
      constexpr long P = 2 * K * LANES;
      std::vector<float> dx(2 * W * P);
      for (long row = piece * rows / pieces; row < (piece + 1) * rows / pieces; row++) {
        const long b = row / row_pairs, i = row % row_pairs;  // rows 2i and 2i + 1 of image b
        const long height = std::min(H - 2 * i, 2L);
        for (long v = 0; v < V; v += 2 * K) {
          for (long h = 2 * i; h < 2 * i + height; h++)
            for (long w = 0; w < W; w++) {  // pixels in no window: the affine part only
              if (i < Ho && w < 2 * Wo) continue;
              vf2 y[1][K];
              conv.template outputs<1, 1>(b, h, w, v, y);
              for (long u = v; u < v + 2 * K; u++)
                st(dx.data() + ((h - 2 * i) * W + w) * P + (u - v) * LANES,
                   a[u] + s[u] * (half(y[0][(u - v) / 2], u) - A.mu[u]));
            }
          for (long j = 0; i < Ho && j < Wo; j++) {
            vf2 y[4][K];
            conv.template outputs<2, 2>(b, 2 * i, 2 * j, v, y);
            for (int k = 0; k < K; k++) {
              const long u = v + 2 * k;
              vf2 dy;
              const auto win = at_maximum(y, v, k, d_out + ((b * Ho + i) * Wo + j) * C, dy);
              const vf2 kdy = ld2(&A.k[u]) * dy, au = ld2(&a[u]), su = ld2(&s[u]);
              for (int q = 0; q < 4; q++) {
                const vf2 affine = au + su * (win.x[q] - ld2(&A.mu[u]));
                st2(dx.data() + ((q / 2) * W + 2 * j + q % 2) * P + 2 * k * LANES,
                    win.at == q ? affine + kdy : affine);
              }
            }
          }
          if (height == 2)
            conv.template add_weight_gradient<2>(b, 2 * i, v, dx.data(), dw);
          else
            conv.template add_weight_gradient<1>(b, 2 * i, v, dx.data(), dw);
        }
      }
    }
    // the pieces added in order, in double: each weight's sum on one thread, pieces 0, 1, ...
#pragma omp for schedule(static)
    for (long t0 = 0; t0 < width; t0 += 64) {
      const long t1 = std::min(width, t0 + 64);
      double total[64] = {};  // weights t0 .. t1 − 1
      for (long piece = 0; piece < pieces; piece++)
        for (long t = t0; t < t1; t++) total[t - t0] += partial[piece * width + t];
      for (long t = t0; t < t1; t++) {
        const long c = t % C, rest = t / C;  // rest = (kh · 3 + kw) · CIN + ci
        d_weight[(c * CIN + rest % CIN) * 9 + rest / CIN] = static_cast<float>(total[t - t0]);
      }
    }
  }
}

// FirstConv<Cin, K>(...) passed to f, for Cin = 1 .. 4 input channels per group
// (layers.FUSED_CONV_INPUTS) and the most pairs of channel vectors K = 4, 2, 1 that the
// channels per group take.
template <class F>
void with_first_conv(long B, long H, long W, long Cin, long C, long G, int threads,
                     const float* x, const float* weight, F f) {
  const long pairs = C / G / 16;
  auto of = [&](auto cin) {
    constexpr int CIN = decltype(cin)::value;
    if (pairs % 4 == 0) return f(FirstConv<CIN, 4>(B, H, W, C, G, threads, x, weight));
    if (pairs % 2 == 0) return f(FirstConv<CIN, 2>(B, H, W, C, G, threads, x, weight));
    return f(FirstConv<CIN, 1>(B, H, W, C, G, threads, x, weight));
  };
  switch (Cin) {
    case 1: return of(std::integral_constant<int, 1>());
    case 2: return of(std::integral_constant<int, 2>());
    case 3: return of(std::integral_constant<int, 3>());
    case 4: return of(std::integral_constant<int, 4>());
  }
}

#if !defined(__AVX512F__)
#pragma GCC pop_options
#endif

}  // namespace

extern "C" {

int metalstm_block_abi() { return 8; }

// Whether the learner should run a first block with its convolution fused (layers.fuses_conv):
// where this build vectorises it well, on AVX-512. Built for AVX2, the fused block took 3-27
// times as long as the convolution and the native tail apart (benchmarks/block_kernels.py on the
// AVX-512 Xeon built with -march=znver1; the 16-channel vectors of its accumulators are twice
// AVX2's registers); it stays correct there, and the tests run it.
long metalstm_block_fuses_conv() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// Forward: out = ReLU(max-pool(γ (x − μ) / sqrt(σ² + ε) + β)) per channel, writing out
// [B, H/2, W/2, C]. With extremes [B, H/2, W/2, C]: μ and σ² are the batch's mean and biased
// variance, written to mean and var [C], in one pass over x that also writes each window's
// input at its maximum to extremes (for the backward), then one over those; extremes null
// (given statistics): they are read from mean and var, in one pass.
void metalstm_block_forward(long B, long H, long W, long C, int threads, const float* x,
                            const float* gamma, const float* beta, float eps, float* out,
                            float* mean, float* var, float* extremes) {
  const long Ho = H / 2, Wo = W / 2, V = C / LANES;
  std::vector<float> invstd(C);
  if (extremes) {
    statistics_and_extremes(B, H, W, C, threads, x, gamma, eps, mean, var, invstd.data(),
                            extremes);
    pool_relu_of_extremes(B * Ho * Wo, C, threads, affine(C, mean, invstd.data(), gamma, beta),
                          extremes, out);
    return;
  }
  invstd = inverse_deviations(C, var, eps);
  const Affine A = affine(C, mean, invstd.data(), gamma, beta);
  const Pixels px{H, W, C};
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (long b = 0; b < B; b++)
    for (long i = 0; i < Ho; i++)
      for (long j = 0; j < Wo; j++) {
        const float* p[4];
        px.of(x, b, i, j, p);
        float* o = out + ((b * Ho + i) * Wo + j) * C;
        for (long v = 0; v < V; v++) {
          const vf best = window(p, v, A).best;
          st(o + v * LANES, best <= 0.0f ? vf{} : best);  // ReLU (NaN stays NaN)
        }
      }
}

// Backward of the forward above, given ∂out [B, H/2, W/2, C] and the forward's mean, var and
// extremes: ∂x [B, H, W, C], ∂γ and ∂β [C] (Ioffe & Szegedy 2015; extremes null, given
// statistics: they are constants, so ∂x = k ∂y). The pooling and ReLU gradient is ∂y = ∂out at
// each window's maximum, found again from x exactly as the forward found it, where the maximum
// is positive, and 0 elsewhere; with the batch's statistics the sums over it take the extremes.
void metalstm_block_backward(long B, long H, long W, long C, int threads, const float* x,
                             const float* extremes, const float* d_out, const float* gamma,
                             const float* beta, const float* mean, const float* var, float eps,
                             float* d_x, float* d_gamma, float* d_beta) {
  const bool given = extremes == nullptr;
  const long pixels = B * H * W, Ho = H / 2, Wo = W / 2, V = C / LANES;
  const std::vector<float> invstd = inverse_deviations(C, var, eps);
  const Affine A = affine(C, mean, invstd.data(), gamma, beta);
  const Pixels px{H, W, C};
  // ∂y at the window's maximum (0 where the ReLU is off), and the maximum's input.
  auto pooled_gradient = [&](const Window& w, const float* d, vf& dy, vf& x_at) {
    dy = w.best > 0.0f ? ld(d) : vf{};
    x_at = w.x_at();
  };
  // ∂x of window (b, i, j)'s four pixels, the constant k ∂y at its maximum and 0 elsewhere
  // (given statistics): dx[q] + v * LANES.
  auto window_gradients = [&](long b, long i, long j, float* (&dx)[4]) {
    const long base = ((b * H + 2 * i) * W + 2 * j) * C;
    dx[0] = d_x + base, dx[1] = d_x + base + C, dx[2] = d_x + base + W * C;
    dx[3] = d_x + base + (W + 1) * C;
  };
  // Σ ∂y and Σ ∂y (x − μ) per channel: sums[0 .. C) and sums[C .. 2C); with given statistics
  // from x, the windows' ∂x in the same pass.
  std::vector<double> sums(2 * C);
  if (given)
    channel_sums(B * Ho * Wo, 2 * C, threads, [&](long first, long last, vd* acc) {
      WindowCursor at(Ho, Wo, first);
      for (long r = first; r < last; r++, at.next()) {
        const float* p[4];
        px.of(x, at.b, at.i, at.j, p);
        float* dx[4];
        window_gradients(at.b, at.i, at.j, dx);
        for (long v = 0; v < V; v++) {
          const Window win = window(p, v, A);
          vf dy, x_at;
          pooled_gradient(win, d_out + r * C + v * LANES, dy, x_at);
          acc[v] += wide(dy);
          acc[V + v] += wide(dy) * wide(x_at - A.mu[v]);
          for (int q = 0; q < 4; q++) st(dx[q] + v * LANES, win.at == q ? A.k[v] * dy : vf{});
        }
      }
    }, sums.data());
  else
    sums = extreme_sums(B * Ho * Wo, C, threads, extremes, d_out, A);
  // ∂x = k ∂y + a + s (x − μ), with a = −k mean(∂y), s = −k / σ · mean(∂y x̂) through the
  // batch's statistics (a = s = 0 for given ones)
  vf a[MAX_VECTORS], s[MAX_VECTORS];
  backward_coefficients(C, pixels, sums.data(), invstd.data(), A, given, d_gamma, d_beta, a, s);
  // Row by row of x: each pair of rows 2i, 2i + 1 with its windows (done above for given
  // statistics), and a last odd row alone.
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (long b = 0; b < B; b++)
    for (long h = 0; h < H; h += 2) {
      const long i = h / 2;
      for (long w = 0; w < W; w++) {  // pixels outside every window: the affine part only
        if (i < Ho && w < 2 * Wo) continue;
        for (long hh = h; hh < std::min(H, h + 2); hh++) {
          const long at = ((b * H + hh) * W + w) * C;
          for (long v = 0; v < V; v++)
            st(d_x + at + v * LANES, a[v] + s[v] * (ld(x + at + v * LANES) - A.mu[v]));
        }
      }
      if (i >= Ho || given) continue;
      for (long j = 0; j < Wo; j++) {
        const float* p[4];
        px.of(x, b, i, j, p);
        float* dx[4];
        window_gradients(b, i, j, dx);
        const float* d = d_out + ((b * Ho + i) * Wo + j) * C;
        for (long v = 0; v < V; v++) {
          const Window win = window(p, v, A);
          vf dy, x_at;
          pooled_gradient(win, d + v * LANES, dy, x_at);
          const vf kdy = A.k[v] * dy;
          for (int q = 0; q < 4; q++) {
            const vf affine = a[v] + s[v] * (win.x[q] - A.mu[v]);
            st(dx[q] + v * LANES, win.at == q ? affine + kdy : affine);
          }
        }
      }
    }
}

// A first block's forward with its convolution fused (FirstConv: its output is never written):
// out [B, H/2, W/2, C] as metalstm_block_forward computes it from that output. With extremes
// [B, H/2, W/2, C]: with the batch's statistics, written to mean and var [C], in one pass of the
// convolution that also writes each window's output at its maximum to extremes (for the
// backward), then one over those; extremes null: with the statistics read there, in one pass.
void metalstm_conv_block_forward(long B, long H, long W, long Cin, long C, long G, int threads,
                                 const float* x, const float* weight, const float* gamma,
                                 const float* beta, float eps, float* out, float* mean,
                                 float* var, float* extremes) {
  with_first_conv(B, H, W, Cin, C, G, threads, x, weight, [&](const auto& conv) {
    std::vector<float> invstd(C);
    if (!extremes) {  // given statistics
      invstd = inverse_deviations(C, var, eps);
      conv_pool_relu(conv, threads, affine(C, mean, invstd.data(), gamma, beta), out);
      return;
    }
    conv_statistics_and_extremes(conv, threads, gamma, eps, mean, var, invstd.data(), extremes);
    pool_relu_of_extremes(B * (H / 2) * (W / 2), C, threads,
                          affine(C, mean, invstd.data(), gamma, beta), extremes, out);
  });
}

// Its backward with the batch's statistics (those the forward wrote, and its extremes): the
// convolution's weight gradient d_weight [C, Cin, 3, 3], ∂γ and ∂β [C], given ∂out
// [B, H/2, W/2, C]; no ∂x (images).
void metalstm_conv_block_backward(long B, long H, long W, long Cin, long C, long G, int threads,
                                  const float* x, const float* weight, const float* extremes,
                                  const float* d_out, const float* gamma, const float* beta,
                                  const float* mean, const float* var, float eps,
                                  float* d_weight, float* d_gamma, float* d_beta) {
  with_first_conv(B, H, W, Cin, C, G, threads, x, weight, [&](const auto& conv) {
    conv_block_backward(conv, threads, extremes, d_out, gamma, beta, mean, var, eps, d_weight,
                        d_gamma, d_beta);
  });
}

}  // extern "C"
