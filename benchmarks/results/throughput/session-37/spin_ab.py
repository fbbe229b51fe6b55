"""Alternating rounds of `metalstm bench` (28x28, batches of 8) under OpenMP wait settings."""
import json, os, statistics, subprocess, sys
VARIANTS = {
    "default": {},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
WORK = {"28g": ["--channels", "1"], "28rgb": ["--channels", "3"]}
rounds, episodes = int(sys.argv[1]), sys.argv[2]
times = {(v, w): [] for v in VARIANTS for w in WORK}
for r in range(rounds):
    for w, args in WORK.items():
        for v, env in VARIANTS.items():
            cmd = [sys.executable, "-m", "metalstm", "bench", "--image-size", "28", *args,
                   "--meta-batch", "8", "--episode-batch", "8", "--episodes", episodes,
                   "--warmup", "8", "--json"]
            out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout)
            t = res.get("seconds_per_episode") or res.get("s_per_episode")
            if t is None:
                print(sorted(res)); sys.exit(1)
            times[(v, w)].append(t)
            print(r, w, v, f"{t:.4f}", flush=True)
for (v, w), ts in times.items():
    print(f"{w:6s} {v:8s} median {statistics.median(ts):.4f} min {min(ts):.4f} all {' '.join(f'{t:.4f}' for t in ts)}")
