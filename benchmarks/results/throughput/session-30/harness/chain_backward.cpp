// The step kernels' chain backward (12 steps, first order) on n coordinates, after the forward
// that made its inputs, repeated for SECONDS. Usage: chain_backward THREADS SECONDS N; prints ns
// per coordinate and step.
// Build: g++ -O3 -march=native -fopenmp -DSRC='"native_step.cpp"' chain_backward.cpp
#include "episode.h"

int main(int argc, char** argv) {
  const int threads = atoi(argv[1]);
  const double seconds = atof(argv[2]);
  const long n = atol(argv[3]), T = Episode::T;
  Episode e(n);
  for (long s = 0; s < T; s++) e.forward(s, threads);
  ChainBackward chain(e);
  const auto start = std::chrono::steady_clock::now();
  long calls = 0;
  do {
    chain.run(threads);
    calls++;
  } while (seconds_since(start) < seconds);
  printf("bwd %.1f ns per coord-step\n", seconds_since(start) / calls / T / n * 1e9);
}
