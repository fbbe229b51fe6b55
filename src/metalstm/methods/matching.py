"""Matching Networks (Vinyals et al., NeurIPS 2016), with and without full context embeddings.

A query x̂ is labelled by attention over the support set S = {(x_i, y_i)}:

    P(y = n | x̂, S) = Σ_i a(x̂, x_i) [y_i = n],    a(x̂, x_i) = softmax_i s · cos(f(x̂), g(x_i))

and trained with the negative log-likelihood of the query labels. The paper has s = 1
(``attention_scale``); the embeddings end with a ReLU, so their cosines lie in [0, 1] and that
softmax is nearly flat: in 5-way 1-shot the attention on the right image is at most e/(e+4) = 0.40,
a floor of 0.90 nats under the loss, and training plateaus near 81 %. The comparison's recipe takes
s = 30 (96 % instead of 81 % on the same budget; tests/test_method_fixes.py). Without FCE,
f = g = the learner's conv-4 embedding. With full context embeddings (the paper's Appendix A),
both depend on the whole support set:

* g(x_i) = g'(x_i) + h→_i + h←_i: a bidirectional LSTM reads the support embeddings g'(x_i);
* f(x̂) = h_K after K steps (``processing_steps``) of an attention LSTM on f'(x̂):
  ĥ_k, c_k = LSTM(f'(x̂), [h_{k-1}, r_{k-1}], c_{k-1}),  h_k = ĥ_k + f'(x̂),
  r_{k-1} = Σ_i softmax_i(h_{k-1}ᵀ g(x_i)) g(x_i),  starting from h_0 = c_0 = 0.

The classifier's logits are log P(y | x̂, S), so their arg-max is the predicted label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import Config
from ..inner_loop import episode_ways
from ..layers import one_thread, product
from ..registry import MethodSettings, register
from .metric import MetricMethod, metric_recipe

REFERENCE = "Vinyals et al., NeurIPS 2016"
# Vinyals et al. (2016), Table 1 (Omniglot; their miniImageNet figures as quoted by Ravi &
# Larochelle 2017, Table 1).
PUBLISHED = {
    ("omniglot", 5, 1): 98.1,
    ("omniglot", 5, 5): 98.9,
    ("omniglot", 20, 1): 93.8,
    ("omniglot", 20, 5): 98.5,
    ("miniimagenet", 5, 1): 43.40,
    ("miniimagenet", 5, 5): 51.09,
}


@dataclass(frozen=True)
class MatchingSettings(MethodSettings):
    """Settings of Matching Networks."""

    attention_scale: float = 1.0  # s: softmax over s · cosine; 1 = the paper's plain cosine
    aliases: ClassVar[Mapping[str, str]] = {"matching_scale": "attention_scale"}

    def checks(self) -> dict[str, bool]:
        return {"attention_scale": self.attention_scale > 0}

    def describe(self) -> str:
        """The scale for the protocol line, when it is not the paper's."""
        return "" if self.attention_scale == 1.0 else f"s = {self.attention_scale:g}"


@dataclass(frozen=True)
class FCESettings(MatchingSettings):
    """Settings of Matching Networks with full context embeddings."""

    processing_steps: int = 5  # K: steps of the query's attention LSTM
    aliases: ClassVar[Mapping[str, str]] = {
        **MatchingSettings.aliases,
        "fce_steps": "processing_steps",
    }
    limits: ClassVar[Mapping[str, int]] = {"processing_steps": 10_000}

    def checks(self) -> dict[str, bool]:
        return {**super().checks(), "processing_steps": self.processing_steps >= 1}


# Training episodes on Omniglot: an episode of the test's shape costs one embedding pass, and
# 5-way 1-shot went from 96.41 % after the presets' 3,000 to 97.83 % after 20,000 (19 minutes of
# one core; benchmarks/results/compare-recipes/).
OMNIGLOT_EPISODES = 20_000
# Queries per class in 20-way training episodes on Omniglot (Vinyals et al. do not give their
# batch size): 15 made 20,000 episodes two hours of one core; with 5, as in Snell et al.'s
# episodes, 50 minutes, and 94.80 % on 20-way 1-shot (benchmarks/results/compare-recipes/).
WIDE_TRAIN_QUERIES = 5


def matching_recipe(config: Config) -> dict[str, float | int]:
    """The metric methods' recipe with the cosines scaled by 30 before the attention softmax, and
    20,000 training episodes on Omniglot, 20-way ones with 5 queries per class (validation
    episodes too; the test keeps its own)."""
    values: dict[str, float | int] = {**metric_recipe(config), "attention_scale": 30.0}
    if config.dataset == "omniglot":
        values["episodes"] = max(config.episodes, OMNIGLOT_EPISODES)
        if config.n_way >= 20:
            values["q_query"] = WIDE_TRAIN_QUERIES
    return values


def attention_probabilities(
    query: Tensor, support: Tensor, support_y: Tensor, n_way: int, scale: float = 1.0
) -> Tensor:
    """[Q, N]: Σ_i softmax_i(s · cos(query, support_i)) [y_i = n] (the Matching Networks
    classifier, s = ``scale``)."""
    cos = product(F.normalize(query, dim=1), F.normalize(support, dim=1).T)  # [Q, S]
    attention = (scale * cos).softmax(dim=1)
    return product(attention, F.one_hot(support_y, n_way).to(attention.dtype))


class FullContextEmbedding(nn.Module):
    """The FCE functions g (bidirectional LSTM) and f (attention LSTM) on embeddings of size D."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.dim, self.steps = dim, steps
        self.support_lstm = nn.LSTM(dim, dim, bidirectional=True)
        # Attention LSTM: gates from the input f'(x̂) and the state [h_{k-1}, r_{k-1}].
        self.query_gates = nn.Linear(3 * dim, 4 * dim)

    def support(self, g: Tensor) -> Tensor:
        """g(x_i) [S, D] from g'(x_i) [S, D]: the support set read as one sequence, both ways."""
        lstm = self.support_lstm
        names = [name for name, _ in lstm.named_parameters()]

        def read(g: Tensor, *weights: Tensor) -> Tensor:
            out, _ = functional_call(lstm, dict(zip(names, weights, strict=True)), g.unsqueeze(1))
            return out.squeeze(1)  # [S, 2D]

        # oneDNN's LSTM backward rounds differently with 1 and 2 threads
        forward, backward = one_thread(read, g, *lstm.parameters()).split(self.dim, dim=1)
        return g + forward + backward

    def query(self, f: Tensor, support: Tensor) -> Tensor:
        """f(x̂) [Q, D] from f'(x̂) [Q, D], attending over the context-embedded support [S, D]."""
        h = torch.zeros_like(f)
        c = torch.zeros_like(f)
        gates = self.query_gates
        for _ in range(self.steps):
            r = product(product(h, support.T).softmax(dim=1), support)  # support read-out
            z = product(torch.cat([f, h, r], dim=1), gates.weight.T, gates.bias)  # [Q, 4D]
            i, forget, o, g = z.chunk(4, dim=1)
            c = torch.sigmoid(forget) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c) + f
        return h


@register(
    "matching",
    title="Matching Networks",
    settings=MatchingSettings,
    recipe=matching_recipe,
    published=PUBLISHED,
    reference=REFERENCE,
)
class MatchingNet(MetricMethod):
    """Matching Networks without FCE: cosine attention over the conv-4 support embeddings."""

    settings: MatchingSettings

    def adaptation(self) -> str:
        return self.settings.describe()

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        probabilities = attention_probabilities(
            query, support, support_y, episode_ways(support_y), self.settings.attention_scale
        )
        return probabilities.clamp_min(1e-12).log()


@register(
    "matching-fce",
    title="Matching Networks FCE",
    settings=FCESettings,
    recipe=matching_recipe,
    reference=REFERENCE,
    published={("miniimagenet", 5, 1): 43.56, ("miniimagenet", 5, 5): 55.31},
)
class MatchingNetFCE(MatchingNet):
    """Matching Networks with full context embeddings (bidirectional and attention LSTMs)."""

    settings: FCESettings

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.fce = FullContextEmbedding(self.embedding_dim, self.settings.processing_steps)

    def adaptation(self) -> str:
        return ", ".join(
            part
            for part in (f"K = {self.settings.processing_steps}", self.settings.describe())
            if part
        )

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        context = self.fce.support(support)
        return super().logits(context, support_y, self.fce.query(query, context))
