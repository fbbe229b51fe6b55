// 12 forward steps, then the first-order chain backward, each timed, REPEATS times (the first
// untimed), on N coordinates: with STORED = 1 the forward writes layer 1's gate activations and
// the backward reads them (stored.cpp, from make_stored.py); 0, the library's way (computed
// again). Prints ns per coordinate and step, and two results to compare between the two.
// Build beside session 30's harness/episode.h:
//   g++ -O3 -march=native -fopenmp -DSRC='"stored.cpp"' stored_main.cpp
// Run: ./a.out THREADS REPEATS N STORED   (session 33: ./a.out 2 6 227840 0, then 1)
#include "episode.h"
int main(int argc, char** argv) {
  const int threads = atoi(argv[1]), repeats = atoi(argv[2]);
  const long n = atol(argv[3]), T = Episode::T, R = Episode::R;
  g_on = atoi(argv[4]) != 0; g_n = n;
  std::vector<std::vector<float>> store(T);
  if (g_on) for (long s = 0; s < T; s++) { store[s].resize(R * n + 16); g_store[s] = store[s].data(); }
  Episode e(n);
  ChainBackward chain(e);
  std::vector<char> junk(64 << 20);
  double tf = 0, tb = 0;
  for (int r = 0; r < repeats; r++) {
    auto t0 = std::chrono::steady_clock::now();
    for (long s = 0; s < T; s++) { g_step = s; e.forward(s, threads); }
    double f = seconds_since(t0);
    for (size_t i = 0; i < junk.size(); i += 64) junk[i] += 1;
    t0 = std::chrono::steady_clock::now();
    chain.run(threads);
    double bb = seconds_since(t0);
    if (r > 0) tf += f, tb += bb;
  }
  double k = 1e9 / ((repeats - 1) * T * n);
  printf("store=%d fwd %.1f bwd %.1f total %.1f ns per coord-step  dtheta0[7]=%g dW[5]=%g\n", (int)g_on, tf * k, tb * k, (tf + tb) * k, chain.d_theta_0[7], chain.d_W[5]);
}
