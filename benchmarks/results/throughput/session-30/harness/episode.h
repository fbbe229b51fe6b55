// What both harnesses share: an episode's inputs to the step kernels on n coordinates (H = 20,
// T = 12 steps, random values of the scales a trained meta-learner sees) and its forward steps.
#include SRC
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

struct Episode {
  static constexpr long H = 20, T = 12, X = H + 2, R = 4 * H;
  long n;
  std::mt19937 gen{0};
  std::normal_distribution<float> normal;
  std::vector<float> random(long k, float scale) {
    std::vector<float> v(k);
    for (float& x : v) x = scale * normal(gen);
    return v;
  }
  std::vector<float> features, grad, W, b, W2, b2{4.5f, -4.5f};
  // step s's inputs at index s, its outputs at s + 1 (gates: at s)
  std::vector<std::vector<float>> h, c, theta, logits, gates;
  explicit Episode(long n) : n(n) {
    features = random(2 * n, 1);
    h = {random(H * n, .5f)}, c = {random(H * n, .5f)};
    theta = {random(n, .1f)}, logits = {random(2 * n, 1)};
    grad = random(n, .01f);
    W = random(R * X, .3f), b = random(R, .3f), W2 = random(2 * X, .3f);
    for (long s = 0; s < T; s++) {
      h.emplace_back(H * n), c.emplace_back(H * n), theta.emplace_back(n);
      logits.emplace_back(2 * n), gates.emplace_back(2 * n);
    }
  }
  void forward(long s, int threads) {
    metalstm_step_forward(1, n, H, threads, features.data(), h[s].data(), c[s].data(),
                          theta[s].data(), logits[s].data(), grad.data(), W.data(), b.data(),
                          W2.data(), b2.data(), theta[s + 1].data(), logits[s + 1].data(),
                          h[s + 1].data(), c[s + 1].data(), gates[s].data());
  }
};

// The first-order chain backward of an episode's T steps (after its forwards) from a random
// ∂θ_T, with the gradients it writes.
struct ChainBackward {
  static constexpr long T = Episode::T, R = Episode::R, X = Episode::X;
  Episode& e;
  const float *features[T], *h[T], *c[T], *theta[T], *logits[T], *grad[T], *W[T], *b[T], *gates[T];
  std::vector<float> d_theta_T, d_theta_0, d_W, d_b, d_W2, d_b2;
  explicit ChainBackward(Episode& e)
      : e(e), d_theta_T(e.random(e.n, 1)), d_theta_0(e.n), d_W(T * R * X), d_b(T * R),
        d_W2(2 * X), d_b2(2) {
    for (long s = 0; s < T; s++) {
      features[s] = e.features.data(), h[s] = e.h[s].data(), c[s] = e.c[s].data();
      theta[s] = e.theta[s].data(), logits[s] = e.logits[s].data(), grad[s] = e.grad.data();
      W[s] = e.W.data(), b[s] = e.b.data(), gates[s] = e.gates[s].data();
    }
  }
  void run(int threads) {
    metalstm_chain_backward(e.n, Episode::H, threads, T, features, h, c, theta, logits, grad, W,
                            b, gates, e.W2.data(), d_theta_T.data(), d_theta_0.data(),
                            d_W.data(), d_b.data(), d_W2.data(), d_b2.data());
  }
};

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
