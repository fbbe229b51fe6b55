"""Chain backward of 12 steps from the initial state: two builds of native_step alternating in one process."""
import ctypes, sys, time, torch
from metalstm.methods.metalearner import native, kernels
libs = {name: ctypes.CDLL(path) for name, path in (("old", sys.argv[1]), ("new", sys.argv[2]))}
real = native.library()
for lib in libs.values():  # same argtypes as the library's handle
    for fn in ("metalstm_chain_backward", "metalstm_step_forward"):
        getattr(lib, fn).argtypes = getattr(real, fn).argtypes
        getattr(lib, fn).restype = getattr(real, fn).restype
H, T = 20, 12
n = int(sys.argv[3]) if len(sys.argv) > 3 else 228_000
g = torch.Generator().manual_seed(0)
r = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g)
feats, grad = r(2, n), r(n, scale=0.01)
W, b, W2, b2 = r(4*H, 2+H, scale=0.3), r(4*H, scale=0.3), r(2, H+2, scale=0.3), torch.tensor([4.5, -4.5])
theta, logits = r(n, scale=0.1), torch.zeros(2, n)
h, c = kernels.zero_state(theta, H), kernels.zero_state(theta, H)
saved = []
for t in range(T):
    out = native.step_forward(H, feats, h, c, theta, logits, grad, W, b, W2, b2, True)
    saved.append(tuple(out[5:]))
    theta, logits, h, c = out[:4]
d = r(n)
times = {k: [] for k in libs}
results = {}
for i in range(int(sys.argv[4]) if len(sys.argv) > 4 else 20):
    for name, lib in (list(libs.items()) if i % 2 == 0 else list(libs.items())[::-1]):
        native.library = lambda lib=lib: lib
        t0 = time.perf_counter(); res = native.chain_backward(H, tuple(saved), d); times[name].append(time.perf_counter() - t0)
        results[name] = res
for name, ts in times.items():
    ts.sort()
    print(f"{name}: median {1e3*ts[len(ts)//2]:.1f} ms, min {1e3*ts[0]:.1f}, q1 {1e3*ts[len(ts)//4]:.1f} ({1e9*ts[len(ts)//2]/T/n:.1f} ns per coord-step)")
print("same bits:", all(torch.equal(a, b) for a, b in zip(results["old"], results["new"])))
