// The step kernels' forward as an episode runs it: 12 steps on n coordinates, each step's outputs
// in their own buffers (the next step's inputs), `evict` MB of other memory written between steps
// (the learner's passes). Usage: forward_chain THREADS REPEATS N EVICT_MB; prints ns per
// coordinate and step (the first repeat and each repeat's first step untimed).
// Build: g++ -O3 -march=native -fopenmp -DSRC='"native_step.cpp"' forward_chain.cpp
#include "episode.h"

int main(int argc, char** argv) {
  const int threads = atoi(argv[1]), repeats = atoi(argv[2]);
  const long n = atol(argv[3]), evict = atol(argv[4]) << 20, T = Episode::T;
  Episode episode(n);
  std::vector<char> junk(evict + 1);
  double total = 0;
  for (int r = 0; r < repeats; r++)
    for (long s = 0; s < T; s++) {
      for (long i = 0; i < evict; i += 64) junk[i] += 1;
      const auto start = std::chrono::steady_clock::now();
      episode.forward(s, threads);
      if (r > 0 && s > 0) total += seconds_since(start);
    }
  printf("fwd %.1f ns per coord-step (evict %ld MB)\n",
         total / ((repeats - 1) * (T - 1)) / n * 1e9, evict >> 20);
}
