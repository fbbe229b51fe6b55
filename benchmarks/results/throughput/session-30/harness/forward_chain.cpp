// The step kernels' forward as an episode runs it: 12 steps on n coordinates, each step's outputs
// in their own buffers (the next step's inputs), `evict` MB of other memory written between steps
// (the learner's passes). Usage: forward_chain THREADS REPEATS N EVICT_MB; prints ns per
// coordinate and step. Build: g++ -O3 -march=native -fopenmp -DSRC='"native_step.cpp"' ...
#include SRC
#include <chrono>
#include <cstdio>
#include <random>
int main(int argc, char** argv) {
  const long n = atol(argv[3]), H = 20, T = 12, X = H + 2, R = 4 * H;
  int threads = atoi(argv[1]); int reps = atoi(argv[2]); long evict = atol(argv[4]) << 20;
  std::mt19937 gen(0); std::normal_distribution<float> nd;
  auto rnd = [&](long k, float s) { std::vector<float> v(k); for (auto& x : v) x = s * nd(gen); return v; };
  auto feat = rnd(2 * n, 1), h0 = rnd(H * n, .5), c0 = rnd(H * n, .5), th0 = rnd(n, .1), lg0 = rnd(2 * n, 1), grad = rnd(n, .01);
  auto W = rnd(R * X, .3), b = rnd(R, .3), W2 = rnd(2 * X, .3);
  std::vector<float> b2 = {4.5f, -4.5f};
  std::vector<std::vector<float>> hs(T + 1, std::vector<float>(H * n)), cs = hs, ths(T + 1, std::vector<float>(n)), lgs(T + 1, std::vector<float>(2 * n)), gts(T, std::vector<float>(2 * n));
  hs[0] = h0; cs[0] = c0; ths[0] = th0; lgs[0] = lg0;
  std::vector<char> junk(evict + 1);
  double total = 0;
  for (int r = 0; r < reps; r++)
    for (int s = 0; s < T; s++) {
      if (evict) { for (long i = 0; i < evict; i += 64) junk[i] += 1; }
      auto t = std::chrono::steady_clock::now();
      metalstm_step_forward(1, n, H, threads, feat.data(), hs[s].data(), cs[s].data(), ths[s].data(), lgs[s].data(), grad.data(), W.data(), b.data(), W2.data(), b2.data(), ths[s+1].data(), lgs[s+1].data(), hs[s+1].data(), cs[s+1].data(), gts[s].data());
      if (r > 0 && s > 0) total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    }
  printf("fwd %.1f ns per coord-step (evict %ld MB)\n", total / ((reps - 1) * (T - 1)) / n * 1e9, evict >> 20);
}
