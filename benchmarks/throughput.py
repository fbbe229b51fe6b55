"""The throughput workloads of the README's Performance table, each run several times.

Usage::

    python benchmarks/throughput.py [--repeats 3] [--episodes 10] [--warmup 2] [--device auto]
                                    [--only NAME ...] [--compile] [--kernels native eager]
                                    [--batches 1 8] [--json FILE]

Meta-training workloads (synthetic images, first-order, 32 filters, 15 queries per class), each in
a fresh process through ``python -m metalstm bench``:

- ``84rgb-5w5s``:  84x84 RGB, 5-way 5-shot, T = 8 on the 25 support images;
- ``84rgb-5w1s``:  84x84 RGB, 5-way 1-shot, T = 12 on 5;
- ``28g-5w1s``:    28x28 grayscale, 5-way 1-shot, T = 12 on 5;
- ``28rgb-5w1s``:  28x28 RGB, 5-way 1-shot, T = 12 on 5;

and ``omniglot-eval600``: evaluation of the 600 fixed Omniglot 5-way 1-shot test episodes (real
images, $METALSTM_DATA; 15 queries per class, as ``metalstm evaluate`` draws them: before
session 19 this workload drew the preset's 5 training queries) by a freshly built model of the
``omniglot-5w1s`` preset, timed end to end as ``metalstm evaluate`` runs them (skipped when the
data is missing).

Prints one Markdown table of medians over the repeats (seconds per episode for meta-training,
seconds for the 600 evaluation episodes) with the spread (min-max), two floors
measured on this machine in a fresh process at the same thread count (median over the repeats):

- *FLOPs at peak*: the workload's estimated GFLOP (``metalstm bench``'s count) at this machine's
  fp32 matrix-multiply rate (2048 x 2048 products): no implementation does the arithmetic faster;
- *LSTM kernels*: the meta-learner's σ and tanh evaluations (T steps over the n coordinates:
  3H + 2 sigmoids and 2H tanh per coordinate and step) and its layer-1 products ([4H, H + 2] x
  [H + 2, n] per step; two more in the backward of meta-training), at the rates PyTorch's own
  ``sigmoid``, ``tanh`` and ``mm`` reach here on tensors of those shapes: the floor of any
  implementation built on those kernels, however well the other operations are fused;

and the median's ratio to the larger floor, whose target is 2.5 (issue 21). ``--kernels native
eager`` runs every workload with both kinds of kernels (the native ones for the meta-learner's
step, the learner blocks' batch norm, max-pool and ReLU and the convolutions' weight gradient,
the library's default where a C++ compiler exists, and the eager PyTorch ones; ``native-step``:
the step's native kernels only; ``step-and-block``: all but the convolutions'), interleaved,
and prints one table for each: a before/after comparison within one run.
``--batches 1 8`` runs every workload in batches of episodes too (the meta-training workloads as
meta-batches of B episodes that run as one batched pass of the learner, ``--meta-batch B
--episode-batch B``; the evaluation B test episodes at a time, ``episode_batch``; issue 21 allows
up to 8 when reported), interleaved, one table per batch size. The last line names the CPU and
its measured rates: timings compare only within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from metalstm.machine import cpu_name

TRAIN_WORKLOADS: dict[str, list[str]] = {
    "84rgb-5w5s": ["--image-size", "84", "--channels", "3", "--shots", "5", "--steps", "8"],
    "84rgb-5w1s": ["--image-size", "84", "--channels", "3", "--shots", "1", "--steps", "12"],
    "28g-5w1s": ["--image-size", "28", "--channels", "1", "--shots", "1", "--steps", "12"],
    "28rgb-5w1s": ["--image-size", "28", "--channels", "3", "--shots", "1", "--steps", "12"],
}
TARGET_RATIO = 2.5  # issue 21: every workload within 2.5x of the larger floor on its machine


# --kernels: which native kernels a workload's process may use (METALSTM_NATIVE).
KERNELS = {
    "native": "1",
    "eager": "0",
    "native-step": "native_step",
    "step-and-block": "native_step,learner_block",
}


def kernel_env(kernels: str) -> dict[str, str]:
    """The environment of a workload's process: ``eager`` turns every native kernel off,
    ``native-step`` keeps the meta-learner step's only, ``step-and-block`` all but the
    convolutions' weight gradient."""
    return {**os.environ, "METALSTM_NATIVE": KERNELS[kernels]}


def run_train(name: str, args: argparse.Namespace, kernels: str, batch: int) -> dict[str, Any]:
    """One ``metalstm.bench`` run of a meta-training workload in a fresh process, in
    meta-batches of ``batch`` episodes run as one batched pass."""
    command = [
        sys.executable,
        "-m",
        "metalstm",
        "bench",
        *TRAIN_WORKLOADS[name],
        "--episodes",
        str(args.episodes),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--compile" if args.compile else "--no-compile",
        "--meta-batch",
        str(batch),
        "--episode-batch",
        str(batch),
        "--json",
    ]
    env = kernel_env(kernels)
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


MACHINE_SCRIPT = """
import json, statistics, time
import torch

def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

a, b, c = (torch.randn(2048, 2048) for _ in range(3))
matmul_gflops = 2 * 2048**3 / median_seconds(lambda: torch.mm(a, b, out=c), 10) / 1e9
x = torch.randn(20, 30000)  # [H, n]: one gate block of the LSTM over ~30k coordinates
y = torch.empty_like(x)
sigmoid_ns = median_seconds(lambda: torch.sigmoid(x, out=y), 50) / x.numel() * 1e9
tanh_ns = median_seconds(lambda: torch.tanh(x, out=y), 50) / x.numel() * 1e9
w, features, z = torch.randn(80, 22), torch.randn(22, 30000), torch.empty(80, 30000)
lstm_product_gflops = 2 * w.numel() * 30000 / median_seconds(
    lambda: torch.mm(w, features, out=z), 50) / 1e9  # layer 1: [4H, H + 2] x [H + 2, n]
print(json.dumps({"matmul_gflops": matmul_gflops, "lstm_product_gflops": lstm_product_gflops,
                  "sigmoid_ns": sigmoid_ns, "tanh_ns": tanh_ns,
                  "threads": torch.get_num_threads()}))
"""


def run_machine() -> dict[str, Any]:
    """This machine's fp32 matmul rates (large square, the LSTM's shape) and σ/tanh cost per
    element, in a fresh process."""
    command = [sys.executable, "-c", MACHINE_SCRIPT]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


EVAL_SCRIPT = """
import json, sys, time
import torch
from metalstm import build_method, load_preset, override
from metalstm.allocator import keep_freed_memory
from metalstm.bench import episode_flops
from metalstm.data import EpisodeSampler, load_split
from metalstm.evaluation import episode_accuracies
from metalstm.layers import block_kernels, conv_kernels
from metalstm.methods.metalearner import step_kernels
from metalstm.util import resolve_device

keep_freed_memory()  # as every metalstm command does
preset = load_preset("omniglot-5w1s")
# the test episodes as `metalstm evaluate` draws them: eval_queries (15) queries per class
config = override(preset, {"device": sys.argv[1], "q_query": preset.eval_queries,
                           "episode_batch": int(sys.argv[2])})
data = load_split("omniglot", config.split, "test", image_size=28, channels=1)
sampler = EpisodeSampler(data, config.n_way, config.k_shot, config.q_query, config.test_seed)
device = resolve_device(config.device)
model = build_method(config).to(device)
start, cpu = time.perf_counter(), time.process_time()
scores = episode_accuracies(model, sampler, range(600))
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
accuracy = sum(scores) / len(scores)
n = model.learner.n_params
gflop = episode_flops(config, n, config.n_way * config.k_shot, "eval") / 1e9
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "accuracy": accuracy,
                  "gflop_per_episode": gflop, "gflops": 600 * gflop / seconds,
                  "settings": {"mode": "eval", "steps": config.settings.eval_steps,
                               "episode_batch": config.episode_batch,
                               "learner_params": n, "hidden": config.settings.hidden_size,
                               "step_kernels": step_kernels(config.compile, device,
                                                            torch.float32),
                               "block_kernels": block_kernels(
                                   device, config.filters * config.episode_batch),
                               "conv_kernels": conv_kernels(device, config.filters)}}))
"""


def run_eval(args: argparse.Namespace, kernels: str, batch: int) -> dict[str, Any]:
    """Evaluation of the 600 Omniglot test episodes in a fresh process (data loading untimed),
    ``batch`` episodes at a time."""
    command = [sys.executable, "-c", EVAL_SCRIPT, args.device, str(batch)]
    env = kernel_env(kernels)
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def have_omniglot() -> bool:
    root = os.environ.get("METALSTM_DATA")
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    folder = Path(root) if root else default
    return (folder / "omniglot" / "images_background.zip").is_file() or (
        folder / "omniglot" / "images_evaluation.zip"
    ).is_file()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each workload (default 3)")
    parser.add_argument("--episodes", type=int, default=10, help="timed episodes per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed episodes per run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the LSTM step")
    parser.add_argument(
        "--only", nargs="+", choices=[*TRAIN_WORKLOADS, "omniglot-eval600"], help="workloads"
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=list(KERNELS),
        default=["native"],
        help="native or eager (PyTorch) kernels for the meta-learner step, the learner "
        "blocks and the convolutions' weight gradient, or native for the step only "
        "(native-step), or all but the convolutions' (step-and-block); several: each workload "
        "with each, interleaved, one table "
        "per kernel (default: native, the library's default; eager where it is unavailable)",
    )
    parser.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=[1],
        help="episodes per batched pass (meta-training: meta-batches of that many; evaluation: "
        "test episodes at a time); several: each workload with each, interleaved, one table "
        "per size (default: 1)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every run's figures")
    args = parser.parse_args()
    names = args.only or [*TRAIN_WORKLOADS, "omniglot-eval600"]
    variants = [(kernels, batch) for kernels in args.kernels for batch in args.batches]
    runs: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {
        variant: {name: [] for name in names} for variant in variants
    }
    machine: list[dict[str, Any]] = []
    for repeat in range(args.repeats):  # workloads interleaved: slow drifts hit all alike
        if args.device in ("auto", "cpu"):
            machine.append(run_machine())
            print(f"[{repeat + 1}/{args.repeats}] machine: {machine[-1]}", file=sys.stderr)
        for name in names:
            for kernels, batch in variants:
                if name == "omniglot-eval600":
                    if not have_omniglot():
                        print(
                            "omniglot-eval600: no Omniglot data; set METALSTM_DATA", file=sys.stderr
                        )
                        continue
                    runs[kernels, batch][name].append(run_eval(args, kernels, batch))
                else:
                    runs[kernels, batch][name].append(run_train(name, args, kernels, batch))
                last = runs[kernels, batch][name][-1]
                figure = last.get("s_per_episode", last.get("seconds"))
                print(
                    f"[{repeat + 1}/{args.repeats}] {name} ({kernels}, batch {batch}): "
                    f"{figure:.4f}",
                    file=sys.stderr,
                )
    rates = {key: statistics.median(m[key] for m in machine) for key in (machine or [{}])[0]}
    tables = [
        f"Kernels: {kernels}; episodes per batched pass: {batch}.\n\n{table(workloads, rates)}"
        for (kernels, batch), workloads in runs.items()
    ]
    print("\n\n".join(tables))
    if args.json is not None:
        labelled = {f"{kernels}, batch {batch}": r for (kernels, batch), r in runs.items()}
        args.json.write_text(json.dumps({"machine": machine, "runs": labelled}, indent=2) + "\n")
    return 0


def lstm_kernel_seconds(result: dict[str, Any], rates: dict[str, float]) -> float:
    """Seconds of one episode's LSTM σ and tanh evaluations and layer-1 products at ``rates``.

    Forward, per step: sigmoid on [3H + 2, n], tanh on 2 x [H, n], the product [4H, H + 2] x
    [H + 2, n]; meta-training adds the backward's two products, [4H, n] x [n, H + 2] for the
    weight gradient and [H, 4H] x [4H, n] for h_{t-1} (first-order: no gradient for g_t's
    features; second-order: [H + 2, 4H] x [4H, n]).
    """
    settings = result["settings"]
    hidden, steps, n = settings["hidden"], settings["steps"], settings["learner_params"]
    elements = steps * n
    activations = (3 * hidden + 2) * rates["sigmoid_ns"] + 2 * hidden * rates["tanh_ns"]
    multiply_adds = 4 * hidden * (hidden + 2)  # forward product, per coordinate and step
    if settings["mode"] == "train":
        backward_input = hidden + 2 if settings["second_order"] else hidden
        multiply_adds += 4 * hidden * (hidden + 2) + 4 * hidden * backward_input
    products = 2 * multiply_adds / rates["lstm_product_gflops"]  # ns per coordinate and step
    return elements * (activations + products) / 1e9


def median_or_dash(results: list[dict[str, Any]], key: str, form: str) -> str:
    """The median of ``key`` over ``results`` formatted with ``form``, or "-" where none has it."""
    values = [r[key] for r in results if key in r]
    return form.format(statistics.median(values)) if values else "-"


def table(runs: dict[str, list[dict[str, Any]]], rates: dict[str, float]) -> str:
    """Markdown table of medians (and min-max) per workload, with the floors at ``rates`` (this
    machine's, see the module docstring; empty on an accelerator), the median's ratio to the
    larger floor and the target that ratio has (:data:`TARGET_RATIO`)."""
    lines = [
        "| workload | median | min-max | floor: FLOPs at peak | floor: LSTM kernels "
        f"| ratio to floor (target {TARGET_RATIO:g}) | GFLOP/episode | GFLOP/s | peak MB | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        if not results:
            continue
        key = "seconds" if name == "omniglot-eval600" else "s_per_episode"
        episodes = 600 if key == "seconds" else 1
        values = [r[key] for r in results]
        median = statistics.median(values)
        unit = "s (600 episodes)" if key == "seconds" else "s/episode"
        gflop = statistics.median(r.get("gflop_per_episode", float("nan")) for r in results)
        gflops = statistics.median(r.get("gflops", float("nan")) for r in results)
        memory = median_or_dash(results, "peak_memory_mb", "{:.0f}")  # evaluation: not measured
        flop_floor = kernel_floor = ratio = "-"
        if rates:
            floors = (
                episodes * gflop / rates["matmul_gflops"],
                episodes * lstm_kernel_seconds(results[0], rates),
            )
            flop_floor, kernel_floor = (f"{floor:.3f}" for floor in floors)
            ratio = f"{median / max(floors):.2f}x"
        lines.append(
            f"| {name} | {median:.3f} {unit} | {min(values):.3f}-{max(values):.3f} | "
            f"{flop_floor} | {kernel_floor} | {ratio} | {gflop:.1f} | {gflops:.1f} | {memory} | "
            f"{len(values)} |"
        )
    parts = (
        ("\nMeta-learner step", "step_kernels"),
        ("Learner block", "block_kernels"),
        ("Convolutions' weight gradient", "conv_kernels"),
    )
    for part, key in parts:
        ran = {r.get("settings", {}).get(key) for rs in runs.values() for r in rs}
        kernels = sorted(k for k in ran if k)
        lines.append(f"{part} kernels: {'; '.join(kernels) or 'not reported'}.")
    if rates:
        lines.append(
            f"This machine: {cpu_name()}, {rates['threads']:.0f} threads: fp32 matmul "
            f"{rates['matmul_gflops']:.1f} GFLOP/s (2048 x 2048), "
            f"{rates['lstm_product_gflops']:.1f} GFLOP/s on the LSTM's [80, 22] x [22, 30000]; "
            f"sigmoid {rates['sigmoid_ns']:.2f} ns and tanh {rates['tanh_ns']:.2f} ns per element."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    raise SystemExit(code)
