// The step kernels' chain backward (12 steps, first order) on n coordinates, after the forward
// that made its inputs, repeated for SECONDS. Usage: chain_backward THREADS SECONDS N; prints ns
// per coordinate and step.
// Build: g++ -O3 -march=native -fopenmp -DSRC='"native_step.cpp"' chain_backward.cpp
#include "episode.h"

int main(int argc, char** argv) {
  const int threads = atoi(argv[1]);
  const double seconds = atof(argv[2]);
  const long n = atol(argv[3]), T = Episode::T, R = Episode::R, X = Episode::X;
  Episode e(n);
  for (long s = 0; s < T; s++) e.forward(s, threads);
  const float *features[T], *h[T], *c[T], *theta[T], *logits[T], *grad[T], *W[T], *b[T], *gates[T];
  for (long s = 0; s < T; s++) {
    features[s] = e.features.data(), h[s] = e.h[s].data(), c[s] = e.c[s].data();
    theta[s] = e.theta[s].data(), logits[s] = e.logits[s].data(), grad[s] = e.grad.data();
    W[s] = e.W.data(), b[s] = e.b.data(), gates[s] = e.gates[s].data();
  }
  std::vector<float> d_theta_T = e.random(n, 1), d_theta_0(n), d_W(T * R * X), d_b(T * R);
  std::vector<float> d_W2(2 * X), d_b2(2);
  const auto start = std::chrono::steady_clock::now();
  long calls = 0;
  do {
    metalstm_chain_backward(n, Episode::H, threads, T, features, h, c, theta, logits, grad, W, b,
                            gates, e.W2.data(), d_theta_T.data(), d_theta_0.data(), d_W.data(),
                            d_b.data(), d_W2.data(), d_b2.data());
    calls++;
  } while (seconds_since(start) < seconds);
  printf("bwd %.1f ns per coord-step\n", seconds_since(start) / calls / T / n * 1e9);
}
