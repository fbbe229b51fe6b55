"""The prepared GPU check (issue 21): the CUDA path's correctness, then its timings, in one run
sized for a short lease of a GPU machine.

On a machine with a CUDA GPU, from the repository root (the package need not be installed: the
script puts ``src/`` on the path of everything it starts)::

    METALSTM_DATA=../shared/data python benchmarks/gpu.py --out benchmarks/results/throughput/gpu

runs, in order of importance, each phase in fresh processes:

1. ``check``: the CUDA tests of ``tests/test_speed_paths.py`` (``pytest -k test_cuda_``): the
   meta-gradient and the adapted logits on the GPU against the CPU in float64, one episode, and a
   batch of three episodes for the meta-learner and MAML (the batched pass: grouped
   convolutions over per-episode θ);
2. ``batches``: ``benchmarks/throughput.py --device cuda`` on its workloads, one episode at a time
   and in batches of 8 (meta-training: meta-batches run as one batched pass; the 600 Omniglot
   test episodes: 8 at a time);
3. ``meta-batch-32``: a meta-batch of 32 Omniglot-sized episodes (28x28 gray 5-way 1-shot,
   T = 12, synthetic images) as one batched pass, and the 600 Omniglot test episodes 32 at a
   time;
4. ``compile``: two workloads in batches of 8 with ``--compile`` (the meta-learner's step through
   ``torch.compile``; ``metalstm bench`` falls back to eager where it cannot compile and reports
   which ran).

It writes four files to ``--out``: ``summary.md`` (the device, driver, torch and CUDA versions,
each phase's status and time, and the throughput tables), ``check.txt`` (pytest's output),
``throughput.json`` (every run's figures, by phase) and ``log.txt`` (the phases' stderr). A phase
that would start after ``--budget`` seconds is skipped and one still running then is stopped; the
summary says which. The 600 test episodes need Omniglot (``$METALSTM_DATA``); without it
``throughput.py`` skips them and says so.

Without CUDA it refuses, unless given ``--device cpu``: with ``--quick`` a dry run of the same
phases on the CPU, each with one short workload and no compile (as the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = ROOT / "benchmarks" / "throughput.py"

DEVICE_SCRIPT = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count)
print(json.dumps(info))
"""


@dataclass
class Phase:
    """One step of the check: a command, where it writes its figures when it times workloads
    (its stdout then holds the tables), and what became of it."""

    name: str
    command: list[str]
    figures_file: Path | None = None
    status: str = "skipped: over the budget"
    seconds: float = 0.0
    stdout: str = ""
    figures: object = None


def environment() -> dict[str, str]:
    """This process's environment with ``src/`` first on PYTHONPATH (an uninstalled checkout)."""
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def throughput(
    args: argparse.Namespace, out: Path, name: str, workloads: list[str] | None,
    batches: list[int], compile: bool = False,
) -> Phase:  # fmt: skip
    """A phase running ``throughput.py`` on ``args.device``: ``workloads`` (None: all of its
    workloads) in batches of each of ``batches`` (``--quick``: 28x28 gray alone, short runs in
    batches of at most 2, no compile)."""
    timing = ["--repeats", str(args.repeats)]
    if args.quick:
        timing = ["--repeats", "1", "--episodes", "2", "--warmup", "1"]
        workloads, batches, compile = ["28g-5w1s"], [min(batches[0], 2)], False
    figures = out / f".{name}.json"
    command = [sys.executable, str(THROUGHPUT), "--device", args.device, *timing]
    command += ["--only", *workloads] if workloads else []
    command += ["--batches", *map(str, batches), "--json", str(figures)]
    return Phase(name, command + (["--compile"] if compile else []), figures)


def phases(args: argparse.Namespace, out: Path) -> list[Phase]:
    """The check's phases, most important first."""
    check = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "test_cuda_"]
    check.append(str(ROOT / "tests" / "test_speed_paths.py"))
    return [
        Phase("check", check),
        throughput(args, out, "batches", None, [1, 8]),
        throughput(args, out, "meta-batch-32", ["28g-5w1s", "omniglot-eval600"], [32]),
        throughput(args, out, "compile", ["28g-5w1s", "84rgb-5w1s"], [8], compile=True),
    ]


def run(phase: Phase, deadline: float, log: list[str]) -> None:
    """Runs ``phase`` if time is left before ``deadline``, stopping it there with every process
    it started (its own process group: throughput.py's workloads run in processes of their own,
    which would otherwise go on beside the next phase)."""
    left = deadline - time.monotonic()
    if left < 10:
        return
    start = time.monotonic()
    process = subprocess.Popen(
        phase.command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        phase.stdout, stderr = process.communicate(timeout=left)
        code = process.returncode
        phase.status = "ok" if code == 0 else f"failed (exit status {code})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        phase.stdout, stderr = process.communicate()
        phase.status = "stopped: over the budget"
    phase.seconds = time.monotonic() - start
    log.append(f"## {phase.name}: {phase.status}\n$ {' '.join(phase.command)}\n{stderr}")
    if phase.figures_file is not None and phase.figures_file.is_file():
        phase.figures = json.loads(phase.figures_file.read_text())
        phase.figures_file.unlink()


def device_info() -> dict[str, object]:
    """The GPU (name, capability, memory), torch and CUDA versions, and the driver; read in a
    process of its own, so that this one holds no CUDA context while the phases run."""
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT], capture_output=True, text=True, check=True
    )
    info: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    info["host"] = platform.node()
    return info


def summary(info: dict[str, object], done: list[Phase], args: argparse.Namespace) -> str:
    """The Markdown summary: device, phases, then each timing phase's tables."""
    lines = [
        f"# GPU check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Device: {json.dumps(info)}",
        f"Command: `python benchmarks/gpu.py --device {args.device} --repeats {args.repeats}"
        f" --budget {args.budget:g}{' --quick' if args.quick else ''}`",
        "",
        "| phase | status | seconds |",
        "| --- | --- | --- |",
        *(f"| {p.name} | {p.status} | {p.seconds:.0f} |" for p in done),
    ]
    for phase in done:
        if phase.name == "check" and phase.stdout:
            last = phase.stdout.strip().splitlines()[-1]
            lines += ["", f"check: {last}"]
        elif phase.stdout:
            lines += ["", f"## {phase.name}", "", phase.stdout.strip()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the four files")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each workload")
    parser.add_argument(
        "--budget", type=float, default=540, help="seconds for all phases (default 540)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one short workload per phase (a dry run)"
    )
    args = parser.parse_args()
    info = device_info()
    if args.device.startswith("cuda") and not info["cuda_available"]:
        print("gpu.py: no CUDA device here; pass --device cpu for a dry run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    done, log = phases(args, args.out), list[str]()
    for phase in done:
        print(f"gpu.py: {phase.name} ...", file=sys.stderr, flush=True)
        run(phase, deadline, log)
        print(f"gpu.py: {phase.name}: {phase.status}", file=sys.stderr, flush=True)
    report = summary(info, done, args)
    (args.out / "summary.md").write_text(report)
    (args.out / "check.txt").write_text(done[0].stdout)
    figures = {p.name: p.figures for p in done if p.figures is not None}
    (args.out / "throughput.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "log.txt").write_text("\n".join(log))
    print(report)
    return 0 if all(p.status == "ok" for p in done) else 1


if __name__ == "__main__":
    sys.exit(main())
