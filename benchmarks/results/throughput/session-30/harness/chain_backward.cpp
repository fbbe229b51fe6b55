// The step kernels' chain backward (12 steps, first order) on n coordinates, after a forward
// that made its inputs, repeated for SECONDS. Usage: chain_backward THREADS SECONDS N; prints ns
// per coordinate and step. Build: g++ -O3 -march=native -fopenmp -DSRC='"native_step.cpp"' ...
#include SRC
#include <chrono>
#include <cstdio>
#include <random>
int main(int argc, char** argv) {
  const long n = atol(argv[3]), H = 20, T = 12, X = H + 2, R = 4 * H;
  int threads = atoi(argv[1]); double secs = atof(argv[2]);
  std::mt19937 gen(0); std::normal_distribution<float> nd;
  auto rnd = [&](long k, float s) { std::vector<float> v(k); for (auto& x : v) x = s * nd(gen); return v; };
  auto feat = rnd(2 * n, 1), h0 = rnd(H * n, .5), c0 = rnd(H * n, .5), th0 = rnd(n, .1), lg0 = rnd(2 * n, 1), grad = rnd(n, .01);
  auto W = rnd(R * X, .3), b = rnd(R, .3), W2 = rnd(2 * X, .3);
  std::vector<float> b2 = {4.5f, -4.5f};
  std::vector<std::vector<float>> hs(T + 1, std::vector<float>(H * n)), cs = hs, ths(T + 1, std::vector<float>(n)), lgs(T + 1, std::vector<float>(2 * n)), gts(T, std::vector<float>(2 * n));
  hs[0] = h0; cs[0] = c0; ths[0] = th0; lgs[0] = lg0;
  for (int s = 0; s < T; s++) metalstm_step_forward(1, n, H, threads, feat.data(), hs[s].data(), cs[s].data(), ths[s].data(), lgs[s].data(), grad.data(), W.data(), b.data(), W2.data(), b2.data(), ths[s+1].data(), lgs[s+1].data(), hs[s+1].data(), cs[s+1].data(), gts[s].data());
  const float *F[T], *Hp[T], *Cp[T], *TH[T], *LG[T], *G[T], *Wp[T], *Bp[T], *GT[T];
  for (int s = 0; s < T; s++) { F[s] = feat.data(); Hp[s] = hs[s].data(); Cp[s] = cs[s].data(); TH[s] = ths[s].data(); LG[s] = lgs[s].data(); G[s] = grad.data(); Wp[s] = W.data(); Bp[s] = b.data(); GT[s] = gts[s].data(); }
  auto dT = rnd(n, 1); std::vector<float> d0(n), dW(T * R * X), db(T * R), dW2(2 * X), db2(2);
  auto t = std::chrono::steady_clock::now(); long k = 0; double e;
  do { metalstm_chain_backward(n, H, threads, T, F, Hp, Cp, TH, LG, G, Wp, Bp, GT, W2.data(), dT.data(), d0.data(), dW.data(), db.data(), dW2.data(), db2.data()); k++;
       e = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count(); } while (e < secs);
  printf("bwd %.1f ns per coord-step\n", e / k / T / n * 1e9);
}
