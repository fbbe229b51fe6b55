"""Both layers of Ravi & Larochelle's meta-learner as an update rule (``init``, ``update``).

The learner's parameters θ (n coordinates, see :mod:`metalstm.learner`) are the cell state of a
two-layer, coordinate-wise LSTM. At inner step t, for every coordinate independently:

1. inputs: the learner's loss L_t and gradient g_t at θ_{t-1} on the support set, each
   preprocessed into two features (Andrychowicz et al. 2016, Sec. 3.2):   x → [n, 4];
2. layer 1, a standard LSTM with hidden size 20 shared by all coordinates:   (h_t, c_t) [n, 20];
3. layer 2, the meta-learner cell (the paper's Eq. 2-4, with the authors' logit feedback):
       f_t = W_F · [h_t, θ_{t-1}, f_{t-1}] + b_F
       i_t = W_I · [h_t, θ_{t-1}, i_{t-1}] + b_I
       θ_t = σ(f_t) ⊙ θ_{t-1} − σ(i_t) ⊙ g_t
   where f_{t-1}, i_{t-1} are the previous gate logits (0 at t = 1) and θ_0 = c_0 is learned.

One step of both layers is one autograd node (:mod:`.kernels`); first-order, with the native
kernels, steps 1 .. T are one node whose backward runs the T steps per block of coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import native
from .kernels import (
    CellStep,
    Chain,
    ChainedSteps,
    StepKernels,
    compiled_kernels,
    flushing_denormals,
    preprocess_rows,
    zero_state,
)


@dataclass
class CellState:
    """Per-coordinate state of the meta-learner between inner steps.

    Coordinates are the last (contiguous) dimension, so every element-wise operation of the
    LSTM runs over long contiguous rows: this layout is several times faster than [n, H].
    """

    theta: Tensor  # [n]    learner parameters (layer-2 cell state)
    gate_logits: Tensor  # [2, n] previous forget and input logits (f_{t-1}, i_{t-1})
    hidden: Tensor  # [H, n] layer-1 LSTM hidden state
    cell: Tensor  # [H, n] layer-1 LSTM cell state


@dataclass
class ChainedState(CellState):
    """A state whose steps so far may be differentiated as one chain (MetaLearnerCell.forward):
    what :meth:`MetaLearnerCell.init` makes when gradients are enabled."""

    chain: Chain


class MetaLearnerCell(nn.Module):
    """Both layers of the meta-learner and the learned initialisation c_0 = θ_0."""

    #: As an update rule (:mod:`metalstm.inner_loop`), it steps E episodes' θ [E, n] itself.
    takes_episode_batches = True

    def __init__(self, theta0: Tensor, hidden_size: int = 20, p: float = 10.0) -> None:
        super().__init__()
        self.p = p
        self.hidden_size = hidden_size
        # Layer 1: a standard LSTM on 4 input features; one matrix for all four gates, rows
        # ordered (input, forget, output, candidate) so the three sigmoid gates are contiguous.
        self.lstm_weight = nn.Parameter(torch.empty(4 * hidden_size, 4 + hidden_size))
        self.lstm_bias = nn.Parameter(torch.empty(4 * hidden_size))
        # Layer 2: rows (forget, input); columns h_t (hidden_size), θ_{t-1}, previous logit.
        self.gate_weight = nn.Parameter(torch.empty(2, hidden_size + 2))  # W_F, W_I
        self.gate_bias = nn.Parameter(torch.empty(2))  # b_F, b_I
        self.theta0 = nn.Parameter(theta0.clone())  # c_0, the learned initialisation [n]
        # Run the step's fused kernels through torch.compile (Config.compile); eager otherwise.
        self.use_compile = False
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The paper's initialisation: U(±0.01), b_F ~ U(4, 5), b_I ~ U(−5, −4); θ_0 untouched."""
        with torch.no_grad():
            for param in (self.lstm_weight, self.lstm_bias, self.gate_weight):
                param.uniform_(-0.01, 0.01, generator=generator)
            self.gate_bias[0].uniform_(4.0, 5.0, generator=generator)  # σ(f) ≈ 0.98: keep θ
            self.gate_bias[1].uniform_(-5.0, -4.0, generator=generator)  # σ(i) ≈ 0.01: small step

    def initial_state(self) -> CellState:
        """The state at t = 0, from the learned initialisation c_0."""
        return self.init(self.theta0)

    def init(self, theta0: Tensor) -> CellState:
        """Update-rule ``init`` (:mod:`metalstm.inner_loop`): θ_0 with zero gate logits and LSTM
        state, the latter as :func:`.kernels.zero_state` (no [2H, n] of zeros to write, and the
        native kernels skip their products). With gradients enabled the steps may form one
        chain for the meta-gradient (:meth:`forward`)."""
        hidden = self.hidden_size
        zeros = theta0.new_zeros(*theta0.shape[:-1], 2, theta0.shape[-1])
        h0, c0 = zero_state(theta0, hidden), zero_state(theta0, hidden)
        if torch.is_grad_enabled():
            return ChainedState(theta0, zeros, h0, c0, Chain(theta0))
        return CellState(theta0, zeros, h0, c0)

    def update(
        self, state: CellState, loss: Tensor, grad: Tensor, last: bool = False
    ) -> tuple[CellState, Tensor]:
        """Update-rule ``update``: one inner step; the info is the gates σ(f_t), σ(i_t) [2, n]."""
        return self(state, loss, grad, last)

    def forward(
        self, state: CellState, loss: Tensor, grad: Tensor, last: bool = False
    ) -> tuple[CellState, Tensor]:
        """One inner step: (state_{t-1}, L_t, g_t [n]) → (state_t, gates σ(f_t), σ(i_t) [2, n]).

        Computed by :func:`step_forward` as one autograd node whose backward is
        :func:`step_backward` (the plain formulation under autograd gives the same numbers,
        several times slower); without a meta-graph (evaluation) nothing is kept for a backward.
        First-order from a state :meth:`init` made, where the kernels have a ``chain`` (native),
        θ_t is instead one node over steps 1 .. t (:class:`.kernels.ChainedSteps`, the same
        numbers) and the other outputs carry no graph: nothing but θ_t is differentiated.
        ``last`` (the inner loop's last step): without a meta-graph the kernels may leave the
        state's h_t, c_t and logits unwritten (zero-size; such a state takes no further step).

        E episodes at once (:attr:`takes_episode_batches`): θ [E, n], L_t [E], g_t [E, n], every
        tensor of the state and the gates with a leading E. The native kernels step them in one
        call at evaluation and on a first-order chain; otherwise each episode steps on its own.
        """
        if state.hidden.shape[-1] != state.theta.shape[-1]:
            raise ValueError("this state came from an inner loop's last step: it takes no more")
        hidden, w = self.hidden_size, self.lstm_weight
        kernels = self._kernels()
        # A meta-graph is wanted: gradients are on and something the step reads requires them.
        graph = torch.is_grad_enabled() and any(
            t.requires_grad
            for t in (*vars(state).values(), loss, grad, *self.parameters())
            if isinstance(t, Tensor)
        )
        # The meta-gradient flows through pre(g_t) and pre(L_t) only second-order: then they are
        # computed differentiably, else by the kernels (the native ones in one pass).
        first_order = not (graph and (loss.requires_grad or grad.requires_grad))
        chained = isinstance(state, ChainedState) and kernels.chain is not None and first_order
        native_kernels = native.takes(hidden, state.theta, grad, w)
        if state.theta.dim() == 2 and not (
            kernels.episodes and native_kernels and (chained or not graph)
        ):
            return self._each_episode(state, loss, grad, last)
        # Inputs of layer 1. The two loss features are the same for every coordinate, so their
        # contribution W[:, 2:4] · pre(L_t) is folded into the bias: b' = b + W[:, 2:4] · pre(L_t)
        # (element-wise: each episode's row has the same bits however many run at once).
        preprocess = kernels.preprocess if first_order else preprocess_rows
        grad_features = preprocess(grad, self.p)  # [2, n] ([E, 2, n])
        loss_features = preprocess(loss.reshape(-1), self.p).reshape(2, *loss.shape, 1)
        bias = self.lstm_bias + loss_features[0] * w[:, 2] + loss_features[1] * w[:, 3]
        weight = torch.cat([w[:, :2], w[:, 4:]], dim=1)  # [4H, 2 + H]: columns (g features, h)
        args = (grad_features, state.hidden, state.cell, state.theta, state.gate_logits, grad)
        params = (weight, bias, self.gate_weight, self.gate_bias)
        if not graph:
            with flushing_denormals():  # no meta-graph wanted (evaluation): nothing kept
                theta, logits, h, cell, gates = kernels.inference(hidden, *args, *params, last=last)
            return CellState(theta, logits, h, cell), gates
        if chained and native_kernels and isinstance(state, ChainedState):
            return self._chained_step(kernels, state, args, params)
        if isinstance(state, ChainedState) and state.chain.steps:
            raise RuntimeError(
                "a chain of first-order steps cannot continue with a second-order one"
            )
        theta, logits, h, cell, gates = CellStep.apply(kernels, hidden, *args, *params)
        return CellState(theta, logits, h, cell), gates

    def _each_episode(
        self, state: CellState, loss: Tensor, grad: Tensor, last: bool
    ) -> tuple[CellState, Tensor]:
        """A step of E episodes as E steps of one (kernels that take one episode, or a
        meta-graph other than a first-order chain): each episode's slice of the state, its
        results stacked."""
        fields = ("theta", "gate_logits", "hidden", "cell")
        steps = [
            self(CellState(*(getattr(state, f)[e] for f in fields)), loss[e], grad[e], last)
            for e in range(state.theta.shape[0])
        ]
        stacked = (torch.stack([getattr(s, f) for s, _ in steps]) for f in fields)
        return CellState(*stacked), torch.stack([gates for _, gates in steps])

    def _chained_step(
        self,
        kernels: StepKernels,
        state: ChainedState,
        args: tuple[Tensor, ...],
        params: tuple[Tensor, ...],
    ) -> tuple[CellState, Tensor]:
        """One first-order step as a link of the state's chain; θ_t's node covers steps 1 .. t."""
        with torch.no_grad(), flushing_denormals():
            theta, logits, h, cell, gates, *saved = kernels.forward(
                self.hidden_size, *(t.detach() for t in (*args, *params))
            )
        weight, bias, gate_weight, gate_bias = params
        chain = Chain(
            state.chain.theta0,
            (*state.chain.steps, tuple(saved)),
            (*state.chain.weights, weight),
            (*state.chain.biases, bias),
        )
        theta = ChainedSteps.apply(
            kernels,
            self.hidden_size,
            chain,
            theta,
            chain.theta0,
            gate_weight,
            gate_bias,
            *chain.weights,
            *chain.biases,
        )
        return ChainedState(theta, logits, h, cell, chain), gates

    def _kernels(self) -> StepKernels:
        return compiled_kernels() if self.use_compile else native.default_kernels()
