"""The meta-learner's native step kernels alone: nanoseconds per coordinate and step.

Usage::

    python benchmarks/step_kernels.py [--repeats 20] [--threads 2] [--steps 4]

For the coordinate counts of the throughput workloads (28,500: one 28x28 episode of 32 filters;
112,000: one Omniglot evaluation episode of 64 filters; 228,000: eight 28x28 episodes at once),
hidden size 20, prints one Markdown table of the median time per coordinate of
``native_step.cpp``'s kernels: one step's forward as meta-training runs it (every output written;
above 32 MB of outputs with streaming stores) and as evaluation runs it (``keep=False``), and the
first-order chain backward of ``--steps`` steps (``metalstm_chain_backward``, per step), beside
the rates ``benchmarks/throughput.py``'s LSTM floor assumes for the same work (PyTorch's
``sigmoid``, ``tanh`` and ``mm`` on this machine): the forward's activations and product, the
backward's two products. The same inputs serve every call, so some may still be in the cache,
as in an episode they are not; the second column times ``--steps`` forward steps chained as an
episode runs them (each step's state the last's output, its outputs new tensors; per step),
which on the AVX-512 Xeon took 4-25 % longer than the first in three runs of 12 steps (session
29). The last line names the CPU: timings
compare only within one run (for a before and after, run this script in alternation with
``PYTHONPATH`` at each checkout's ``src``).
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from grouped_conv import kernel_arguments, median_ms
from metalstm.machine import cpu_name
from metalstm.methods.metalearner import native
from throughput import lstm_kernel_seconds, run_machine

HIDDEN = 20
SIZES = [
    (28_500, "one 28x28 episode, 32 filters"),
    (112_000, "one Omniglot evaluation episode, 64 filters"),
    (228_000, "eight 28x28 episodes at once"),
]


def step_inputs(n: int, generator: torch.Generator) -> list[Tensor]:
    """One step's inputs after t = 1 (state and weights away from zero)."""

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=generator)

    return [
        rand(2, n),  # preprocessed g_t
        rand(HIDDEN, n, scale=0.5),  # h_{t-1}
        rand(HIDDEN, n, scale=0.5),  # c_{t-1}
        rand(n, scale=0.1),  # θ_{t-1}
        rand(2, n),  # previous gate logits
        rand(n, scale=0.01),  # g_t
        rand(4 * HIDDEN, 2 + HIDDEN, scale=0.3),
        rand(4 * HIDDEN, scale=0.3),
        rand(2, HIDDEN + 2, scale=0.3),
        torch.tensor([4.5, -4.5]),
    ]


def forward(inputs: list[Tensor], keep: bool = True) -> tuple[Tensor, ...]:
    """native.step_forward on one step's ``inputs`` (as :func:`step_inputs` lists them)."""
    features, h, c, theta, logits, grad, weight, bias, gate_weight, gate_bias = inputs
    return native.step_forward(
        HIDDEN, features, h, c, theta, logits, grad, weight, bias, gate_weight, gate_bias, keep
    )


def chain(inputs: list[Tensor], steps: int) -> tuple[tuple[Tensor, ...], ...]:
    """What ``steps`` forward steps from ``inputs`` save for the chain backward, each step's
    state the last's, its outputs new tensors: as an episode's steps run."""
    saved = []
    for _ in range(steps):
        out = forward(inputs)
        saved.append(tuple(out[5:]))
        theta, logits, h, c = out[:4]
        inputs = [inputs[0], h, c, theta, logits, *inputs[5:]]
    return tuple(saved)


def floor_ns(rates: dict[str, float]) -> tuple[float, float]:
    """ns per coordinate and step of throughput.py's LSTM floor at ``rates``: the forward's part
    (its σ, tanh and layer-1 product), and what first-order meta-training adds (the backward's
    two products)."""

    def ns(mode: str) -> float:
        settings = {"mode": mode, "second_order": False, "steps": 1, "learner_params": 1}
        return 1e9 * lstm_kernel_seconds({"settings": {**settings, "hidden": HIDDEN}}, rates)

    return ns("eval"), ns("train") - ns("eval")


def row(n: int, label: str, args: argparse.Namespace, floors: tuple[float, float]) -> str:
    generator = torch.Generator().manual_seed(n)
    inputs = step_inputs(n, generator)
    per = 1e6 / n  # ms per call -> ns per coordinate
    train = median_ms(lambda: forward(inputs), args.repeats)
    chained = median_ms(lambda: chain(inputs, args.steps), args.repeats) / args.steps
    evaluation = median_ms(lambda: forward(inputs, keep=False), args.repeats)
    steps = chain(inputs, args.steps)
    d_theta = torch.randn(n, generator=generator)
    backward = median_ms(lambda: native.chain_backward(HIDDEN, steps, d_theta), args.repeats)
    return (
        f"| {n:,} ({label}) | {train * per:.1f} | {chained * per:.1f} | {evaluation * per:.1f} "
        f"| {floors[0]:.1f} | {backward * per / args.steps:.1f} | {floors[1]:.1f} |"
    )


def main() -> None:
    args = kernel_arguments(
        __doc__,
        lambda parser: parser.add_argument(
            "--steps", type=int, default=4, help="steps in the chain backward (default 4)"
        ),
    )
    if not native.available():
        raise SystemExit(f"native step kernels unavailable here: {native.status()}")
    floors = floor_ns(run_machine())
    print(
        "| coordinates | forward, meta-training (ns) | the same, --steps chained (ns) "
        "| forward, evaluation (ns) | floor (ns) | chain backward, per step (ns) | floor (ns) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, label in SIZES:
        print(row(n, label, args, floors))
    print(f"\nmachine: {cpu_name()}, {args.threads} threads; hidden size {HIDDEN}")


if __name__ == "__main__":
    main()
