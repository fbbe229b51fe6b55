#!/bin/bash
# Builds the session-30 variants of native_step.cpp (variants.py, units.patch) from 3438f19's
# source in a temporary folder and times them, ROUNDS rounds alternating, on this machine:
# forward_chain at 512 coordinates (1 thread: L1/L2), 28,160 (1 thread) and 227,840 (2 threads:
# 8 episodes' worth; multiples of 512, which `tiled` needs), chain_backward at 512 (1 thread)
# and 227,840 (2 threads); ns per coordinate and step. From the repository root:
#   ROUNDS=3 bash benchmarks/results/throughput/session-30/harness/measure.sh > measured.txt
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
git show 3438f19:src/metalstm/methods/metalearner/native_step.cpp > "$work/base.cpp"
cp "$here/variants.py" "$here/episode.h" "$here/forward_chain.cpp" "$here/chain_backward.cpp" "$work/"
(cd "$work" && python3 variants.py base.cpp && cp base.cpp units.cpp && patch -s -p5 units.cpp < "$here/units.patch")
build() { g++ -O3 -march=native -fopenmp -DSRC="\"$work/$2.cpp\"" "$work/$1.cpp" -o "$work/$1_$2" 2>/dev/null; }
forward=(base noact noprod none tiled fb1024 fb2048 units)
backward=(base wg6)
for v in "${forward[@]}"; do build forward_chain "$v"; done
for v in "${backward[@]}"; do build chain_backward "$v"; done
grep -m1 "model name" /proc/cpuinfo
for r in $(seq "${ROUNDS:-3}"); do
  for v in "${forward[@]}"; do
    echo "forward $v round $r: $("$work/forward_chain_$v" 1 4000 512 0 | awk '{print $2}')" \
      "$("$work/forward_chain_$v" 1 300 28160 0 | awk '{print $2}')" \
      "$("$work/forward_chain_$v" 2 10 227840 0 | awk '{print $2}')"
  done
  for v in "${backward[@]}"; do
    echo "backward $v round $r: $("$work/chain_backward_$v" 1 2 512 | awk '{print $2}')" \
      "$("$work/chain_backward_$v" 2 3 227840 | awk '{print $2}')"
  done
done
rm -rf "$work"
