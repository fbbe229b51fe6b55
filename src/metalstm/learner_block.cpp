// The learner block's batch norm, 2x2 max-pool and ReLU as one forward and one backward over
// channels-last tensors: with the batch's own statistics (layers.batch_norm_pool_relu) or with
// given ones (``given``: running statistics, layers.normalise_pool_relu). The PyTorch
// composition makes about ten passes over the [B, C, H, W] activations each way (statistics,
// centring, squares, normalisation, pooling with int64 indices, ReLU, then the zero-filled
// max-pool gradient and batch norm's backward); here the forward reads x twice (the sums for
// mean and variance, then normalise-and-pool) and writes only the pooled output, and the
// backward reads x twice (the sums, then ∂x), finding each window's maximum again rather than
// storing it. With given statistics each reads x once: no statistics to sum forward, and ∂x,
// which does not depend on the sums then, written in the same pass as them. At evaluation a
// first block (1-4 input channels) computes its 3x3 convolution inside the given-statistics
// forward (metalstm_conv_block_forward, layers.conv_normalise_pool_relu): its [B, H, W, C] output
// is never written.
// Built and loaded by metalstm/native.py (optional: needs a C++ compiler).
//
// Layout: x [B, H, W, C] (NHWC, channels contiguous, C a multiple of 8), pooled tensors
// [B, H/2, W/2, C]; a window's first maximum in PyTorch's scan order (row by row) wins, as in
// PyTorch's max-pool, and rows or columns left over by an odd side belong to no window
// (PyTorch's floor mode).
//
// Determinism: every sum over pixels is taken in double, per block of ROWS pixels, and the block
// sums added in block order, so the results do not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

// One 2x2 window at channel vector v: the normalised values' first maximum (PyTorch's max-pool:
// a later value wins if greater, or NaN), its position 0..3 and the four inputs.
struct Window {
  vf best;
  vi at;
  vf x[4];
};

inline Window window(const vf (&x)[4], long v, const Affine& A) {
  Window w;
  for (int q = 0; q < 4; q++) w.x[q] = x[q];
  w.best = (w.x[0] - A.mu[v]) * A.k[v] + A.beta[v];
  w.at = vi{} + 0;
  for (int q = 1; q < 4; q++) {
    const vf y = (w.x[q] - A.mu[v]) * A.k[v] + A.beta[v];
    const vi wins = (y > w.best) | (y != y);
    w.best = wins ? y : w.best;
    w.at = wins ? vi{} + q : w.at;
  }
  return w;
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
  const vf2 mu = ld2(&A.mu[v]), k = ld2(&A.k[v]), beta = ld2(&A.beta[v]);
  vf2 best = (x[0] - mu) * k + beta;
  for (int q = 1; q < 4; q++) {
    const vf2 y = (x[q] - mu) * k + beta;
    best = (y > best) | (y != y) ? y : best;
  }
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

long blocks_of(long rows) { return (rows + ROWS - 1) / ROWS; }

// total[0 .. width) = Σ over rows r of the vectors f(first, last, acc) adds into
// acc[0 .. width / 8) for rows first .. last − 1 in order, in double: blocks of ROWS rows summed
// in parallel, then added in block order.
template <class F>
void channel_sums(long rows, long width, int threads, F f, double* total) {
  const long blocks = blocks_of(rows), vectors = width / LANES;
  std::vector<double> partial(blocks * width);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long blk = 0; blk < blocks; blk++) {
    vd acc[2 * MAX_VECTORS] = {};
    f(blk * ROWS, std::min(rows, (blk + 1) * ROWS), acc);
    std::memcpy(partial.data() + blk * width, acc, vectors * sizeof(vd));
  }
  std::fill(total, total + width, 0.0);
  for (long blk = 0; blk < blocks; blk++)
    for (long c = 0; c < width; c++) total[c] += partial[blk * width + c];
}

// The batch's mean and biased variance σ² [C] of x [pixels, C], in one pass of shifted sums about
// K = the first pixel's values (no cancellation to speak of in double when the mean is far
// from 0), and 1 / sqrt(σ² + ε) from the variance in double.
void batch_statistics(long pixels, long C, int threads, const float* x, float eps, float* mean,
                      float* var, float* invstd) {
  const long V = C / LANES;
  vd shift[MAX_VECTORS];
  for (long v = 0; v < V; v++) shift[v] = wide(ld(x + v * LANES));
  std::vector<double> sums(2 * C);  // Σ (x − K): [0 .. C), Σ (x − K)²: [C .. 2C)
  channel_sums(pixels, 2 * C, threads, [&](long first, long last, vd* acc) {
    for (long r = first; r < last; r++)
      for (long v = 0; v < V; v++) {
        const vd d = wide(ld(x + r * C + v * LANES)) - shift[v];
        acc[v] += d;
        acc[V + v] += d * d;
      }
  }, sums.data());
  for (long c = 0; c < C; c++) {
    const double d = sums[c] / pixels, v = std::max(sums[C + c] / pixels - d * d, 0.0);
    mean[c] = static_cast<float>(shift[c / LANES][c % LANES] + d);
    var[c] = static_cast<float>(v);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(v + eps));
  }
}

// The first block at evaluation (given statistics) in one pass over its input: the 3x3
// convolution (padding 1, stride 1, no bias) of x [B, H, W, G·Cin] by weight [C, Cin, 3, 3] in G
// groups, then the forward above with given = 1, writing out [B, H/2, W/2, C]. Each window's four
// convolution outputs stay in registers: for the few input channels of a first block (an image's
// 1 or 3) the convolution is a few multiply-adds per output, and writing its [B, H, W, C] output
// and reading it back cost more. Each output sums its taps in the order kh, kw, ci, one fused
// multiply-add each, over a zero-padded copy of x (oneDNN sums a single channel's taps in the
// order kw, kh: the two differ in the last bit of some outputs). C / G is a multiple of 16, so
// each pair of channel vectors lies in one group.
template <int CIN>
void conv_block_forward(long B, long H, long W, long C, long G, int threads, const float* x,
                        const float* weight, const Affine& A, float* out) {
  const long Ho = H / 2, Wo = W / 2, V = C / LANES, Cx = G * CIN, Cg = C / G;
  const long Hp = H + 2, Wp = W + 2;
  std::unique_ptr<float[]> padded(new float[B * Hp * Wp * Cx]);  // x with a border of zeros
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
  std::vector<float> taps(9 * CIN * C);  // [kh, kw, ci, C]: a tap's weights for every channel
  for (long c = 0; c < C; c++)
    for (long ci = 0; ci < CIN; ci++)
      for (long t = 0; t < 9; t++) taps[(t * CIN + ci) * C + c] = weight[(c * CIN + ci) * 9 + t];
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (long b = 0; b < B; b++)
    for (long i = 0; i < Ho; i++)
      for (long j = 0; j < Wo; j++) {
        // the window's 4 x 4 padded input pixels: rows 2i .. 2i + 3, columns 2j .. 2j + 3
        const float* patch = padded.get() + ((b * Hp + 2 * i) * Wp + 2 * j) * Cx;
        float* o = out + ((b * Ho + i) * Wo + j) * C;
        long g = -1;
        float p[4][4][CIN];  // this group's patch
        for (long v = 0; v < V; v += 2) {  // two vectors of channels at a time
          if (v * LANES / Cg != g) {
            g = v * LANES / Cg;
            for (int r = 0; r < 4; r++)
              for (int s = 0; s < 4; s++)
                for (int ci = 0; ci < CIN; ci++)
                  p[r][s][ci] = patch[(r * Wp + s) * Cx + g * CIN + ci];
          }
          vf2 acc[4] = {};  // the window's pixels (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1)
          const float* wv = taps.data() + v * LANES;
          for (int kh = 0; kh < 3; kh++)
            for (int kw = 0; kw < 3; kw++)
              for (int ci = 0; ci < CIN; ci++) {
                const vf2 w = ld2(wv + ((kh * 3 + kw) * CIN + ci) * C);
                for (int q = 0; q < 4; q++) acc[q] += w * p[kh + q / 2][kw + q % 2][ci];
              }
          st2(o + v * LANES, pooled_relu(acc, v, A));
        }
      }
}

}  // namespace

extern "C" {

int metalstm_block_abi() { return 5; }

// Forward: out = ReLU(max-pool(γ (x − μ) / sqrt(σ² + ε) + β)) per channel, writing out
// [B, H/2, W/2, C]. given = 0: μ and σ² are the batch's mean and biased variance, written to
// mean and var [C]; given = 1: they are read from mean and var.
void metalstm_block_forward(long B, long H, long W, long C, int threads, const float* x,
                            const float* gamma, const float* beta, float eps, float* out,
                            float* mean, float* var, int given) {
  const long Ho = H / 2, Wo = W / 2, V = C / LANES;
  std::vector<float> invstd(C);
  if (given)
    for (long c = 0; c < C; c++)
      invstd[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
  else
    batch_statistics(B * H * W, C, threads, x, eps, mean, var, invstd.data());
  Affine A;
  for (long c = 0; c < C; c++) {
    A.mu[c / LANES][c % LANES] = mean[c];
    A.k[c / LANES][c % LANES] = gamma[c] * invstd[c];
    A.beta[c / LANES][c % LANES] = beta[c];
  }
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

// Backward of the forward above, given ∂out [B, H/2, W/2, C] and the forward's mean and var:
// ∂x [B, H, W, C], ∂γ and ∂β [C] (Ioffe & Szegedy 2015; given = 1: the statistics are constants,
// so ∂x = k ∂y). The pooling and ReLU gradient is ∂y = ∂out at each window's maximum, found again
// from x exactly as the forward found it, where the maximum is positive, and 0 elsewhere.
void metalstm_block_backward(long B, long H, long W, long C, int threads, const float* x,
                             const float* d_out, const float* gamma, const float* beta,
                             const float* mean, const float* var, float eps, float* d_x,
                             float* d_gamma, float* d_beta, int given) {
  const long pixels = B * H * W, Ho = H / 2, Wo = W / 2, V = C / LANES;
  Affine A;
  std::vector<float> invstd(C);
  for (long c = 0; c < C; c++) {
    invstd[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
    A.mu[c / LANES][c % LANES] = mean[c];
    A.k[c / LANES][c % LANES] = gamma[c] * invstd[c];
    A.beta[c / LANES][c % LANES] = beta[c];
  }
  const Pixels px{H, W, C};
  // ∂y at the window's maximum (0 where the ReLU is off), and the maximum's input.
  auto pooled_gradient = [&](const Window& w, const float* d, vf& dy, vf& x_at) {
    dy = w.best > 0.0f ? ld(d) : vf{};
    x_at = w.x[0];
    for (int q = 1; q < 4; q++) x_at = w.at == q ? w.x[q] : x_at;
  };
  // ∂x of window (b, i, j)'s four pixels, the constant k ∂y at its maximum and 0 elsewhere
  // (given statistics): dx[q] + v * LANES.
  auto window_gradients = [&](long b, long i, long j, float* (&dx)[4]) {
    const long base = ((b * H + 2 * i) * W + 2 * j) * C;
    dx[0] = d_x + base, dx[1] = d_x + base + C, dx[2] = d_x + base + W * C;
    dx[3] = d_x + base + (W + 1) * C;
  };
  // Σ ∂y and Σ ∂y (x − μ) per channel: sums[0 .. C) and sums[C .. 2C); with given statistics
  // the windows' ∂x in the same pass.
  std::vector<double> sums(2 * C);
  channel_sums(B * Ho * Wo, 2 * C, threads, [&](long first, long last, vd* acc) {
    WindowCursor at(Ho, Wo, first);
    for (long r = first; r < last; r++, at.next()) {
      const float* p[4];
      px.of(x, at.b, at.i, at.j, p);
      float* dx[4];
      if (given) window_gradients(at.b, at.i, at.j, dx);
      for (long v = 0; v < V; v++) {
        const Window win = window(p, v, A);
        vf dy, x_at;
        pooled_gradient(win, d_out + r * C + v * LANES, dy, x_at);
        acc[v] += wide(dy);
        acc[V + v] += wide(dy) * wide(x_at - A.mu[v]);
        if (given)
          for (int q = 0; q < 4; q++) st(dx[q] + v * LANES, win.at == q ? A.k[v] * dy : vf{});
      }
    }
  }, sums.data());
  // ∂x = k ∂y + a + s (x − μ), with a = −k mean(∂y), s = −k / σ · mean(∂y x̂) through the
  // batch's statistics (a = s = 0 for given ones)
  vf a[MAX_VECTORS], s[MAX_VECTORS];
  for (long c = 0; c < C; c++) {
    d_beta[c] = static_cast<float>(sums[c]);
    d_gamma[c] = static_cast<float>(sums[C + c]) * invstd[c];
    const float k = given ? 0.0f : A.k[c / LANES][c % LANES];
    a[c / LANES][c % LANES] = -k * d_beta[c] / pixels;
    s[c / LANES][c % LANES] = -k * invstd[c] * d_gamma[c] / pixels;
  }
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

// The first block at evaluation, its convolution fused with the tail: conv_block_forward for
// Cin = 1 .. 4 input channels per group (layers.FUSED_CONV_INPUTS).
void metalstm_conv_block_forward(long B, long H, long W, long Cin, long C, long G, int threads,
                                 const float* x, const float* weight, const float* gamma,
                                 const float* beta, const float* mean, const float* var,
                                 float eps, float* out) {
  Affine A;
  for (long c = 0; c < C; c++) {
    const float invstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
    A.mu[c / LANES][c % LANES] = mean[c];
    A.k[c / LANES][c % LANES] = gamma[c] * invstd;
    A.beta[c / LANES][c % LANES] = beta[c];
  }
  switch (Cin) {
    case 1: return conv_block_forward<1>(B, H, W, C, G, threads, x, weight, A, out);
    case 2: return conv_block_forward<2>(B, H, W, C, G, threads, x, weight, A, out);
    case 3: return conv_block_forward<3>(B, H, W, C, G, threads, x, weight, A, out);
    case 4: return conv_block_forward<4>(B, H, W, C, G, threads, x, weight, A, out);
  }
}

}  // extern "C"
