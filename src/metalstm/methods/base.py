"""The one small interface every few-shot method implements.

A method is an ``nn.Module`` whose parameters are its meta-parameters. It is meta-trained by the
shared training loop through :meth:`Method.meta_loss` (one episode in, a differentiable loss
out), adapts to a support set with :meth:`Method.adapt`, and labels a query set with the
returned classifier. Every method uses the same episodes, learner, checkpoints and evaluation.

A method module registers its class with :func:`metalstm.registry.register`, with its own
settings dataclass (``self.settings``), what the Trainer trains it on
(:class:`~metalstm.registry.TrainsOn`: :meth:`Method.meta_loss` on episodes,
:meth:`Method.batch_loss` on mini-batches, or nothing), its ``compare`` recipe and published
figures.

Optional hooks (all with defaults): :meth:`Method.configure` fills in settings that depend on
the training classes before the method is built; :meth:`Method.validate` lets a method choose
evaluation settings on the validation episodes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import Config, override
from ..data import ClassImages, Episode, Episodes
from ..inner_loop import (
    AdaptedLearner,
    InnerLoopResult,
    InnerLoopSettings,
    episode_loss,
    episode_theta0,
    prototype_start,
    query_statistics,
)
from ..learner import (
    BatchNormState,
    Learner,
    LearnerShape,
    batchnorm_buffers,
    register_batchnorm_buffers,
)
from ..registry import MethodSettings

Classifier = Callable[[Tensor], Tensor]
"""An adapted model: images [B, C, H, W] → logits [B, N]."""

Adapter = Callable[[Tensor, Tensor], Sequence[Classifier]]
"""Support images and labels → one or more classifiers (e.g. one per candidate setting)."""

Score = Callable[[Adapter], list[float]]
"""``score(adapt)``: the mean validation accuracy of each classifier ``adapt`` returns."""


@dataclass
class EpisodeLoss:
    """Result of one meta-training episode (of a batch of episodes: the sums over them)."""

    loss: Tensor  # scalar, differentiable w.r.t. the meta-parameters
    accuracy: float  # query accuracy in [0, 1] (summed over a batch of episodes)


NO_BATCHNORM = "none"  # Method.test_batchnorm of a method without batch norm
META_BN_PREFIX = "meta_bn_"  # buffers of the statistics accumulated over meta-training


QUERY_BN_LABELS = {
    "support": "support statistics",
    "final": "support statistics at θ_T",
    "meta": "meta-training statistics",
}


def episode_batchnorm(transductive: bool, query_bn: str = "support") -> str:
    """The statistics that normalise query images under the episode protocol (SPEC §1), as the
    protocol line states them: the support passes' running statistics (``query_bn=support``, the
    authors'), those with one more support pass at θ_T (``final``), those accumulated over
    meta-training (``meta``), or with ``transductive`` the query batch's own."""
    return "transductive" if transductive else QUERY_BN_LABELS[query_bn]


class Method(nn.Module, ABC):
    """A few-shot learning method: meta-train on episodes, adapt to a support set, predict."""

    name: ClassVar[str]  # set by metalstm.registry.register
    settings: MethodSettings  # the method's own settings (config.settings), typed by subclasses

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.settings = config.settings
        self.learner = Learner(learner_shape(config), config.bn_momentum, config.bn_eps)

    def batches_episodes(self) -> bool:
        """Whether :meth:`meta_loss` and :meth:`adapt` take a batch of episodes at once
        (:class:`~metalstm.data.Episodes`; support images [E, N*K, C, H, W], labels [E, N*K],
        queries [E, N*Q, C, H, W] → logits [E, N*Q, N]), which ``Config.episode_batch`` then
        uses. Default: no."""
        return False

    def any_ways(self) -> bool:
        """Whether the method handles episodes of any number of ways (no output layer of a fixed
        size), so it may meta-train on more ways than it is tested on (``train_n_way``). Default:
        an inner-loop method whose head is built per episode (``head_init``)."""
        settings = self.settings
        return isinstance(settings, InnerLoopSettings) and settings.head_init != "learned"

    def meta_loss(self, episode: Episode | Episodes) -> EpisodeLoss:
        """Query loss after adapting to the support set; differentiable in the meta-parameters
        (for a batch of episodes, where :meth:`batches_episodes`, the sum of theirs).

        Called by the Trainer for a method registered with ``TrainsOn.EPISODES``.
        """
        raise NotImplementedError(f"{type(self).__name__} is not meta-trained on episodes")

    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        """Fit to a support set (images [N*K, C, H, W], labels [N*K]) at evaluation time."""

    def adaptation(self) -> str:
        """How :meth:`adapt` fits a support set, in a few words for the protocol line of every
        reported number (e.g. ``T = 8`` for the meta-learner); empty when there is no setting to
        state (the metric methods embed the support set and compare)."""
        return ""

    def test_batchnorm(self) -> str:
        """Which batch-norm statistics normalise the query images at evaluation: the support
        passes' (the authors' protocol) or, with ``transductive``, the query batch's own;
        :data:`NO_BATCHNORM` for a method without a network."""
        return episode_batchnorm(self.config.transductive)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits [N*Q, N] of the query images after adapting to the support set."""
        return self.adapt(support_x, support_y)(query_x)

    @classmethod
    def configure(cls, config: Config, train: ClassImages) -> Config:
        """``config`` with the settings that depend on the training classes filled in.

        The Trainer calls this before building the method, so a shape that depends on the data
        (e.g. a classifier with one output per training class) is fixed in the config saved with
        every checkpoint. Default: ``config`` unchanged.
        """
        return config

    def batch_loss(self, images: Tensor, labels: Tensor) -> EpisodeLoss:
        """Loss on a mini-batch of training images [B, C, H, W] with their class indices [B].

        Called by the Trainer for a method registered with ``TrainsOn.BATCHES``.
        """
        raise NotImplementedError(f"{type(self).__name__} is not trained on mini-batches")

    def validate(self, score: Score) -> float:
        """Validation accuracy. ``score(adapt)`` runs ``adapt`` on the support set of every
        validation episode of the Trainer and returns the mean query accuracy of each classifier
        it returned (in order).

        A method whose evaluation settings are chosen on validation episodes (the fine-tuning
        baseline's learning rate and steps) overrides this to score every candidate in one pass
        and keep the best in its buffers, so the best checkpoint carries it. Default: the
        accuracy of :meth:`adapt`.
        """
        return score(self.adapt_one)[0]

    def adapt_one(self, support_x: Tensor, support_y: Tensor) -> list[Classifier]:
        """:meth:`adapt` as an :data:`Adapter`: the one classifier of the method as it stands."""
        return [self.adapt(support_x, support_y)]

    def pretraining(self) -> Config | None:
        """The config of a phase the Trainer runs first, in ``RUN/pretrain`` (resumed if it was
        killed, reused once finished), whose trained method :meth:`start_from` then takes; None
        (default) for none."""
        return None

    def start_from(self, trained: Method) -> None:
        """Take the meta-parameters' starting point from the finished :meth:`pretraining`."""

    def param_groups(self) -> list[dict[str, Any]]:
        """The meta-parameters as optimiser groups; a group's ``lr_scale`` multiplies the meta
        learning rate (default: one group at the run's ``lr``)."""
        return [{"params": list(self.parameters())}]

    @property
    def device(self) -> torch.device:
        """Device of the parameters (or buffers); the CPU for a method with neither."""
        for tensor in chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")


class InnerLoopMethod(Method):
    """A method that adapts by running an inner loop on the support set (MAML, the meta-learner):
    the meta-loss is the query loss at θ_T (Ravi & Larochelle 2017, Method 1 l. 12; Finn et al.
    2017, Eq. 1), and at evaluation the learner at θ_T labels the queries with the support
    passes' statistics (or, ``transductive``, their own)."""

    settings: InnerLoopSettings
    meta_bn_episodes: Tensor  # buffer (query_bn=meta): episodes accumulated so far

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if self.settings.query_bn == "meta":
            self.meta_bn_names = register_batchnorm_buffers(self, self.learner, META_BN_PREFIX)
            self.register_buffer("meta_bn_episodes", torch.zeros((), dtype=torch.long))

    def batches_episodes(self) -> bool:
        """Yes, but with statistics accumulated over meta-training (``query_bn=meta``), which
        are folded in one episode at a time."""
        return self.settings.query_bn != "meta"

    @property
    @abstractmethod
    def theta0(self) -> nn.Parameter:
        """The meta-learned initialisation θ_0 (the learner's coordinates, head included only
        when ``head_init`` is ``learned``)."""

    def pretraining(self) -> Config | None:
        """With ``init_body=pretrained``: the pre-trained classifier of the Baseline-finetune
        method (all training classes, its own recipe), for ``pretrain_epochs`` epochs."""
        if self.settings.init_body != "pretrained":
            return None
        from .finetune import Finetune  # here: finetune imports this module
        from .pretraining import pretrained_recipe

        values = {
            **pretrained_recipe(self.config),
            "pretrain_epochs": self.settings.pretrain_epochs,
        }
        # validation of the pre-training only records a figure: a few episodes
        values["val_episodes"] = min(20, self.config.val_episodes)
        return override(self.config, {"method": Finetune.name, **values})

    def start_from(self, trained: Method) -> None:
        """θ_0's body ← the pre-trained classifier's conv body (same layout; the head stays)."""
        from .pretraining import PretrainedClassifier

        assert isinstance(trained, PretrainedClassifier)
        body = trained.body()
        with torch.no_grad():
            self.theta0[: body.shape[0]].copy_(body.to(self.theta0))

    def initial_theta(self) -> Tensor:
        """θ_0 before meta-training: the learner's own initialisation, without its head when the
        head is built per episode (``head_init``), so the meta-learned θ_0 fits any n_way."""
        theta = self.learner.initial_theta()
        return theta if self.settings.head_init == "learned" else theta[: self.learner.n_body]

    def episode_theta0(self, theta0: Tensor, support_x: Tensor, support_y: Tensor) -> Tensor:
        """θ_0 for this support set: ``theta0`` with the head of ``head_init``
        (:func:`metalstm.inner_loop.episode_theta0`)."""
        return episode_theta0(self.learner, theta0, support_x, support_y, self.settings.head_init)

    def episode_start(
        self, theta0: Tensor, support_x: Tensor, support_y: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """θ_0 for this support set (:meth:`episode_theta0`) and the keywords that start
        :func:`~metalstm.inner_loop.run_inner_loop` from it: at evaluation with the prototype
        head, the episode's statistics and first support pass, computed with the head from one
        forward of the body (:func:`~metalstm.inner_loop.prototype_start`); else none."""
        if torch.is_grad_enabled() or self.settings.head_init != "prototypes":
            return self.episode_theta0(theta0, support_x, support_y), {}
        theta, bn, loss, grad = prototype_start(self.learner, theta0, support_x, support_y)
        return theta, {"bn": bn, "first_pass": (loss, grad)}

    @abstractmethod
    def inner_loop(self, support_x: Tensor, support_y: Tensor, steps: int) -> InnerLoopResult:
        """``steps`` updates of the learner on the support set (:func:`run_inner_loop`)."""

    def meta_loss(self, episode: Episode | Episodes) -> EpisodeLoss:
        """Query loss at θ_T (meta-training protocol: batch statistics, or with
        ``train_query_bn`` the support passes' running statistics or the accumulated ones); for
        a batch of episodes, the sum of their losses and of their accuracies.

        With ``query_bn=meta`` the running statistics the episode ends with join the accumulated
        ones (:meth:`accumulate_batchnorm`)."""
        result = self.inner_loop(episode.support_x, episode.support_y, self.settings.inner_steps)
        mode = self.settings.train_query_bn
        if mode == "meta":
            bn = self.meta_batchnorm()
        elif mode == "support":  # the support set's, as at test (query_bn support or final)
            query_bn = "final" if self.settings.query_bn == "final" else "support"
            bn = query_statistics(self.learner, result, episode.support_x, query_bn, False)
        else:  # batch: the query batch's own statistics (the running ones are updated)
            bn = result.bn
        logits = self.learner(result.theta, episode.query_x, bn, batch_stats=mode == "batch")
        if self.settings.query_bn == "meta":
            self.accumulate_batchnorm(result.bn)
        loss = episode_loss(logits, episode.query_y)  # [] or [E]
        return EpisodeLoss(loss.sum(), accuracy(logits, episode.query_y))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        """The learner at θ_T after ``eval_steps`` updates (no meta-graph), whose query pass
        normalises with the statistics of ``query_bn``
        (:func:`~metalstm.inner_loop.query_statistics`); for a batch of episodes (see
        :meth:`batches_episodes`) one classifier of all of them."""
        with torch.no_grad():
            result = self.inner_loop(support_x, support_y, self.settings.eval_steps)
        query_bn, transductive = self.settings.query_bn, self.config.transductive
        accumulated = self.meta_batchnorm() if query_bn == "meta" else None
        bn = query_statistics(self.learner, result, support_x, query_bn, transductive, accumulated)
        return AdaptedLearner(self.learner, result.theta, bn, transductive)

    def test_batchnorm(self) -> str:
        return episode_batchnorm(self.config.transductive, self.settings.query_bn)

    def meta_batchnorm(self) -> BatchNormState:
        """A copy of the running statistics accumulated over meta-training (``query_bn=meta``):
        those each episode ends with, after its support passes (and its query pass, with batch
        statistics), averaged over the first 1/``meta_bn_rate`` episodes, then an exponential
        moving average of rate ``meta_bn_rate`` (as MAML++ accumulates its statistics;
        Antoniou et al. 2019, Sec. 4). No information from a test episode's queries."""
        stats = batchnorm_buffers(self, self.meta_bn_names, META_BN_PREFIX)
        return {name: value.clone() for name, value in stats.items()}

    def accumulate_batchnorm(self, bn: BatchNormState) -> None:
        """Fold one meta-training episode's final running statistics ``bn`` into the
        accumulated ones (see :meth:`meta_batchnorm`)."""
        with torch.no_grad():
            self.meta_bn_episodes += 1
            # a tensor, so the hot path never waits on the device for the count
            rate = self.meta_bn_episodes.reciprocal().clamp_min(self.settings.meta_bn_rate)
            stats = batchnorm_buffers(self, self.meta_bn_names, META_BN_PREFIX)
            for name, value in stats.items():
                value.lerp_(bn[name].to(value), rate.to(value))


def learner_shape(config: Config, n_way: int | None = None) -> LearnerShape:
    """The learner ``config`` describes, with ``n_way`` outputs (default: the config's N)."""
    ways = config.n_way if n_way is None else n_way
    return LearnerShape(config.channels, config.image_size, ways, config.filters, config.downsample)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max is the label (logits [B, N], labels [B]); for a batch of
    episodes (logits [E, B, N], labels [E, B]) the sum of each episode's fraction."""
    return (logits.argmax(-1) == labels).float().mean(-1).sum().item()
