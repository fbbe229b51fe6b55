"""The one inner loop: an update rule trains the learner on a support set, step by step.

An update rule is an ``(init, update)`` pair (as in torchopt / optax):

    state_0 = rule.init(θ_0)
    state_t, info_t = rule.update(state_{t-1}, L_t, g_t, last=t == T)   t = 1..T
    θ_t = state_t.theta

where L_t and g_t = ∇θ L_t are the learner's support loss and gradient at θ_{t-1}
(:func:`learner_loss_and_grad`). Plain SGD (:class:`SGD`: MAML's inner loop, fine-tuning, the
ablation of the meta-learner) and the meta-learner cell (Ravi & Larochelle 2017, Eq. 2) are both
update rules; :func:`run_inner_loop` runs any of them, and
:class:`~metalstm.methods.metalearner.optimizer.MetaLSTMOptimizer` runs the cell's ``update`` on
any model's parameters.

A batch of E episodes runs as one inner loop: θ_0 [E, n], support images [E, B, C, H, W] and
labels [E, B]. The learner's passes take all E at once (:mod:`metalstm.learner`), each episode's
loss is its own mean, and the rule updates each episode's state on its own (:class:`PerEpisode`;
the meta-learner's cell steps all E in one call); every result then has a leading episode
dimension.

Example::

    result = run_inner_loop(learner, SGD(lr=0.4), theta0, support_x, support_y, steps=5)
    logits = AdaptedLearner(learner, result.theta, result.bn, transductive=False)(query_x)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .learner import BatchNormState, Learner, linear_head
from .registry import MethodSettings


class HasTheta(Protocol):
    @property
    def theta(self) -> Tensor: ...  # the learner's parameters [n]


S = TypeVar("S", bound=HasTheta)


class UpdateRule(Protocol[S]):
    """``init(θ_0) → state``; ``update(state, L_t, g_t, last) → (state, info)``; ``state.theta``
    = θ_t.

    ``info`` is what the rule wants to report about the step (the meta-learner's gates
    σ(f_t), σ(i_t) [2, n]), or None. ``last``: the loop's last step, after which only θ_t and
    the info are read (a rule may skip the rest of its state then). A rule with a true
    ``takes_episode_batches`` attribute takes a batch of E episodes itself (θ_0 [E, n], L_t [E],
    g_t [E, n], info with a leading E); :func:`run_inner_loop` wraps any other in
    :class:`PerEpisode`.
    """

    def init(self, theta0: Tensor) -> S: ...

    def update(
        self, state: S, loss: Tensor, grad: Tensor, last: bool = False
    ) -> tuple[S, Tensor | None]: ...


@dataclass(frozen=True)
class SGDState:
    theta: Tensor  # [n]


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent: θ_t = θ_{t-1} − lr · g_t."""

    lr: float

    def init(self, theta0: Tensor) -> SGDState:
        return SGDState(theta0)

    def update(
        self, state: SGDState, loss: Tensor, grad: Tensor, last: bool = False
    ) -> tuple[SGDState, None]:
        return SGDState(state.theta - self.lr * grad), None


@dataclass(frozen=True)
class PerEpisodeState:
    states: tuple[Any, ...]  # one rule state per episode

    @property
    def theta(self) -> Tensor:
        """θ of every episode [E, n]."""
        return torch.stack([state.theta for state in self.states])


@dataclass(frozen=True)
class PerEpisode:
    """An update rule applied to each episode of a batch on its own: θ [E, n], L_t [E] and
    g_t [E, n] in, the rule's info stacked [E, ...] out. Each episode keeps its own state (the
    meta-learner's [H, n] LSTM state is never copied into a batch)."""

    rule: UpdateRule[Any]

    def init(self, theta0: Tensor) -> PerEpisodeState:
        return PerEpisodeState(tuple(self.rule.init(theta) for theta in theta0.unbind(0)))

    def update(
        self, state: PerEpisodeState, loss: Tensor, grad: Tensor, last: bool = False
    ) -> tuple[PerEpisodeState, Tensor | None]:
        steps = [
            self.rule.update(s, l_e, g_e, last)
            for s, l_e, g_e in zip(state.states, loss.unbind(0), grad.unbind(0), strict=True)
        ]
        infos = [info for _, info in steps if info is not None]
        info = torch.stack(infos) if len(infos) == len(steps) else None
        return PerEpisodeState(tuple(s for s, _ in steps)), info


def episode_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of an episode's logits [B, N] and labels [B]; of each episode of a
    batch, [E] from logits [E, B, N] and labels [E, B]."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return losses.view(labels.shape).mean(1)


def learner_loss_and_grad(
    learner: Learner,
    theta: Tensor,
    x: Tensor,
    y: Tensor,
    bn: BatchNormState,
    second_order: bool,
    batch_stats: bool = True,
) -> tuple[Tensor, Tensor]:
    """The learner's support loss L_t and gradient g_t = ∇θ L_t [n] at θ (for a batch of
    episodes, each episode's: L_t [E], g_t [E, n]).

    First-order: θ is detached, so L_t and g_t are constants for the meta-gradient. Second-order:
    the gradient keeps its graph (``create_graph``) and the meta-gradient flows through it.
    ``batch_stats``: normalise with the batch's statistics (updating ``bn``'s running ones), or
    with ``bn`` as it is.
    """
    with torch.enable_grad():
        at = theta if second_order else theta.detach().requires_grad_(True)
        loss = episode_loss(learner(at, x, bn, batch_stats=batch_stats), y)
        (grad,) = torch.autograd.grad(loss.sum(), at, create_graph=second_order)
    if second_order:
        return loss, grad
    return loss.detach(), grad


@dataclass
class InnerLoopResult:
    theta: Tensor  # θ_T [n] ([E, n] for a batch of episodes, as every tensor here)
    bn: BatchNormState  # running statistics after the support passes
    support_losses: list[Any]  # L_1 .. L_T (each a list of E for a batch of episodes)
    infos: list[Tensor] = field(default_factory=list)  # per step, the rule's info (if recorded)
    thetas: dict[int, Tensor] = field(default_factory=dict)  # θ_t at the steps asked for


def run_inner_loop(
    learner: Learner,
    rule: UpdateRule[Any],
    theta0: Tensor,
    support_x: Tensor,
    support_y: Tensor,
    steps: int,
    *,
    bn: BatchNormState | None = None,
    batch_stats: bool = True,
    second_order: bool = False,
    grad_scale: float = 1.0,
    record_info: bool = False,
    keep_steps: tuple[int, ...] = (),
    first_pass: tuple[Tensor, Tensor] | None = None,
) -> InnerLoopResult:
    """``steps`` updates of the learner by ``rule`` from θ_0 on the support set.

    ``bn``: the batch-norm state the support passes read and update (default: fresh statistics
    for this episode, the authors' protocol); ``batch_stats=False`` normalises with ``bn`` as it
    is (fine-tuning with a pre-trained network's statistics). ``second_order``: the meta-gradient
    flows through g_t (only when gradients are enabled). ``grad_scale`` multiplies g_t before the
    rule sees it. ``keep_steps``: also return θ_t after those steps (0: θ_0). ``first_pass``:
    L_1 and g_1, already computed at θ_0 with ``bn`` (:func:`prototype_start`). θ_0 [E, n] runs
    a batch of E episodes (see the module's docstring).
    """
    if theta0.dim() == 2 and not getattr(rule, "takes_episode_batches", False):
        rule = PerEpisode(rule)
    if bn is None:
        episodes = theta0.shape[0] if theta0.dim() == 2 else 1
        bn = learner.fresh_batchnorm_state(support_x.device, support_x.dtype, episodes)
    second_order = second_order and torch.is_grad_enabled()
    state = rule.init(theta0)
    thetas = {0: theta0} if 0 in keep_steps else {}
    losses, infos = [], []
    for step in range(1, steps + 1):
        if step == 1 and first_pass is not None:
            loss, grad = first_pass
        else:
            loss, grad = learner_loss_and_grad(
                learner, state.theta, support_x, support_y, bn, second_order, batch_stats
            )
        scaled = grad * grad_scale if grad_scale != 1.0 else grad
        state, info = rule.update(state, loss, scaled, last=step == steps)
        losses.append(loss.detach())
        if record_info and info is not None:
            infos.append(info.detach())
        if step in keep_steps:
            thetas[step] = state.theta
    # One host transfer for all steps (a float() per step would wait on the device each time).
    support_losses = torch.stack(losses).tolist() if losses else []
    return InnerLoopResult(state.theta, bn, support_losses, infos, thetas)


def final_support_pass(
    learner: Learner, result: InnerLoopResult, support_x: Tensor
) -> BatchNormState:
    """``result.bn`` after one more support pass, at θ_T (no gradient; ``query_bn=final``).

    The support passes run at θ_0 .. θ_{T-1}, so their running statistics describe the learner
    before its last update; the queries are classified at θ_T. This pass folds the support set's
    statistics at θ_T into the running ones with the learner's BN momentum, as every support pass
    does (with momentum 1 they become exactly θ_T's). Only support images: non-transductive.
    """
    with torch.no_grad():
        learner(result.theta.detach(), support_x, result.bn, batch_stats=True)
    return result.bn


def query_statistics(
    learner: Learner,
    result: InnerLoopResult,
    support_x: Tensor,
    query_bn: str,
    transductive: bool,
    accumulated: BatchNormState | None = None,
) -> BatchNormState:
    """The running statistics an episode's queries are normalised with at evaluation, after the
    inner loop ``result``: the support passes' (``query_bn=support``, the authors' protocol),
    those after one more support pass at θ_T (``final``: :func:`final_support_pass`), or the
    ``accumulated`` ones of meta-training (``meta``). With ``transductive`` the queries are
    normalised with their own batch statistics, so nothing more is computed."""
    if transductive:
        return result.bn
    if query_bn == "meta":
        if accumulated is None:
            raise ValueError("query_bn=meta needs the accumulated statistics")
        return dict(accumulated)
    if query_bn == "final":
        return final_support_pass(learner, result, support_x)
    return result.bn


HEAD_INITS = ("learned", "zero", "prototypes")
QUERY_BN = ("support", "final", "meta")


def episode_theta0(
    learner: Learner, theta0: Tensor, support_x: Tensor, support_y: Tensor, head_init: str
) -> Tensor:
    """θ_0 of one episode: the learned initialisation θ_0 [n] with its linear head as learned
    (``learned``: the paper's c_0), zero (``zero``), or set from the support set
    (``prototypes``: the head that makes the learner a Prototypical Network at θ_0, W_k = 2 μ_k,
    b_k = −||μ_k||² for the mean support embedding μ_k of class k; Triantafillou et al. 2020,
    "Meta-Dataset", Sec. 3.2, Proto-MAML). The support pass for the prototypes uses its own
    fresh batch statistics, and the meta-gradient flows through μ_k into θ_0's body.

    With a head built per episode, θ_0 takes the episode's number of ways (the labels'), so
    meta-training episodes may have more ways than test episodes. For a batch of episodes
    (support images [E, S, C, H, W]) θ_0 is [E, n], each row its episode's.
    """
    theta0 = per_episode(theta0, support_x)
    if head_init == "learned":
        return theta0
    ways = episode_ways(support_y)
    features = learner.features(theta0, support_x, batch_stats=True)  # [(E,) S, D]
    if head_init == "zero":
        zeros = features.new_zeros
        batch = features.shape[:-2]
        return learner.with_head(
            theta0, zeros(*batch, ways, features.shape[-1]), zeros(*batch, ways)
        )
    return learner.with_head(theta0, *prototype_head(features, support_y))


def per_episode(theta0: Tensor, support_x: Tensor) -> Tensor:
    """θ_0 [n] as one row per episode [E, n] for a batch of episodes' support images
    [E, S, C, H, W] (a view, nothing copied); as it is for one episode's."""
    return theta0.expand(support_x.shape[0], -1) if support_x.dim() == 5 else theta0


def prototype_head(features: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor]:
    """The head that makes the learner a Prototypical Network on these support embeddings
    (:func:`episode_theta0`): W_k = 2 μ_k [N, D], b_k = −||μ_k||² [N] for the mean embedding μ_k
    of class k; [E, N, D] and [E, N] for a batch of episodes' features [E, S, D]."""
    ways = episode_ways(support_y)
    if features.dim() == 2:
        means = class_means(features, support_y, ways)  # [N, D]
    else:
        means = torch.stack([class_means(f, y, ways) for f, y in zip(features, support_y)])
    return 2 * means, -means.pow(2).sum(-1)


def prototype_start(
    learner: Learner, theta0: Tensor, support_x: Tensor, support_y: Tensor
) -> tuple[Tensor, BatchNormState, Tensor, Tensor]:
    """θ_0 with the prototype head (:func:`episode_theta0`, ``prototypes``) and the first support
    pass there, (θ_0, bn, L_1, g_1), from one forward of the conv body, which both need: at
    evaluation (no meta-graph) the head's pass and the first step's are the same forward at θ_0's
    body. ``bn`` is the episode's running statistics as the first support pass leaves them. The
    same numbers as :func:`episode_theta0` then :func:`learner_loss_and_grad`.
    """
    episodes = support_x.shape[0] if support_x.dim() == 5 else None
    theta0 = per_episode(theta0, support_x)
    bn = learner.fresh_batchnorm_state(support_x.device, support_x.dtype, episodes or 1)
    with torch.enable_grad():
        body = theta0[..., : learner.n_body].detach().contiguous().requires_grad_(True)
        features = learner.features(body, support_x, bn, batch_stats=True)  # [(E,) S, D]
        weight, bias = (
            t.requires_grad_(True) for t in prototype_head(features.detach(), support_y)
        )
        logits = linear_head(features, weight.flatten(0, -2), bias.flatten(), episodes)
        loss = episode_loss(logits, support_y)
        d_body, d_weight, d_bias = torch.autograd.grad(loss.sum(), (body, weight, bias))
    theta = learner.with_head(theta0, weight.detach(), bias.detach())
    return theta, bn, loss.detach(), torch.cat([d_body, d_weight.flatten(-2), d_bias], dim=-1)


def class_means(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """[N, D]: the mean of the rows of ``embeddings`` [S, D] with each label ``0..n_way-1``."""
    sums = embeddings.new_zeros(n_way, embeddings.shape[1]).index_add(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=n_way).clamp_min(1).to(embeddings.dtype)
    return sums / counts.unsqueeze(1)


def episode_ways(support_y: Tensor) -> int:
    """N of an episode whose labels are ``0..N-1``."""
    return int(support_y.max()) + 1


@dataclass
class AdaptedLearner:
    """The learner at θ_T with its episode's batch-norm statistics."""

    learner: Learner
    theta: Tensor
    bn: BatchNormState
    transductive: bool

    def __call__(self, x: Tensor) -> Tensor:
        # Non-transductive: the running statistics of the support passes (the authors' test
        # protocol); transductive: the query batch's own statistics.
        bn = {k: v.clone() for k, v in self.bn.items()}
        with torch.no_grad():
            return self.learner(self.theta, x, bn, batch_stats=self.transductive)


@dataclass(frozen=True)
class InnerLoopSettings(MethodSettings):
    """Settings of a method that adapts by an inner loop on the support set."""

    inner_steps: int = 12  # T: updates of the learner on the support set
    eval_inner_steps: int | None = None  # T at evaluation; None = inner_steps
    # BN of the query pass at test: support (the authors': the support passes' running
    # statistics) | final (those with one more support pass at θ_T: final_support_pass) |
    # meta (running statistics accumulated over meta-training episodes)
    query_bn: str = "support"
    meta_bn_rate: float = 0.01  # query_bn=meta: weight of each episode in those statistics
    # BN of the query pass while meta-training: batch (the authors') | support (the support
    # passes' running statistics as query_bn makes them at test) | meta (the accumulated ones)
    train_query_bn: str = "batch"
    head_init: str = "learned"  # θ_0's linear head: learned | zero | prototypes (episode_theta0)
    # θ_0's conv body before meta-training: random (the learner's initialisation) | pretrained
    # (a classifier over every training class, trained first in the same run, RUN/pretrain)
    init_body: str = "random"
    pretrain_epochs: float = 5.0  # epochs of that pre-training (init_body=pretrained)
    limits: ClassVar[Mapping[str, int]] = {"inner_steps": 10_000, "eval_inner_steps": 10_000}

    def checks(self) -> dict[str, bool]:
        return {
            "inner_steps": self.inner_steps >= 1,
            "eval_inner_steps": self.eval_inner_steps is None or self.eval_inner_steps >= 1,
            "query_bn": self.query_bn in QUERY_BN,
            "meta_bn_rate": 0.0 < self.meta_bn_rate <= 1.0,
            # the accumulated statistics exist only with query_bn=meta
            "train_query_bn": self.train_query_bn in ("batch", "support")
            or (self.train_query_bn == "meta" and self.query_bn == "meta"),
            "head_init": self.head_init in HEAD_INITS,
            "init_body": self.init_body in ("random", "pretrained"),
            "pretrain_epochs": self.pretrain_epochs > 0,
        }

    @property
    def eval_steps(self) -> int:
        """Inner steps at evaluation (defaults to the training value)."""
        return self.eval_inner_steps or self.inner_steps
