"""The learner: the paper's 4-block convolutional classifier, evaluated on a flat parameter vector.

Ravi & Larochelle (2017), Sec. 4: four blocks of [3x3 conv with ``filters`` channels, batch norm,
ReLU, 2x2 max-pool], then a linear layer to N outputs. Finn et al.'s (2017, Sec. 5.2) Omniglot
learner (``downsample="stride"``) is the same four blocks with stride-2 convolutions instead of the
max-pools (28 → 14 → 7 → 4 → 2) and the last block's output averaged over space, so the linear
layer sees ``filters`` features. The meta-learner sees the learner's
parameters θ as one flat vector of n coordinates (its cell state), so every forward pass here takes
θ explicitly and runs the module through :func:`torch.func.functional_call`.

A batch of E episodes runs as one pass: θ [E, n] on images [E, B, C, H, W], each episode a group
of channels of every layer ([B, E·C, H, W], grouped convolutions), so batch norm's per-channel
statistics are per episode and the passes of small support sets stop paying each operator's
fixed cost E times (issue #21).

Batch norm follows the authors' protocol: its running statistics are episode state (fresh for every
episode, updated by the support passes), and its scale/shift are part of θ.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .layers import (
    conv_batch_norm_pool_relu,
    conv_batch_norm_relu,
    conv_normalise_pool_relu,
    conv_normalise_relu,
    product,
    update_running_stats,
)

BatchNormState = dict[str, Tensor]
# how each block halves the image, in words
DOWNSAMPLING = {"pool": "2x2 max-pools", "stride": "stride-2 convolutions, features averaged"}


@dataclass(frozen=True)
class LearnerShape:
    """What fixes the size and meaning of θ."""

    channels: int
    image_size: int
    n_way: int
    filters: int
    downsample: str = "pool"  # a key of DOWNSAMPLING

    def __post_init__(self) -> None:
        if self.downsample not in DOWNSAMPLING:
            raise ValueError(
                f"downsample must be one of {', '.join(DOWNSAMPLING)}, not {self.downsample!r}"
            )

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


class Block(nn.Module):
    """3x3 conv → batch norm → ReLU → 2x2 max-pool (see :mod:`metalstm.layers`), or a stride-2
    3x3 conv → batch norm → ReLU (``pool`` false: Finn et al.'s Omniglot blocks).

    The conv bias b is part of θ (the paper's layout). With batch statistics, batch norm
    subtracts the per-channel mean, which cancels b exactly, so it is not added and subtracted
    in float: its gradient is exactly zero instead of rounding noise (which the meta-learner's
    sign features and Adam's normalised steps would amplify). Where b does act, it enters as a
    constant shift: the running mean records the mean with b, and normalising with the running
    statistics adds it back (folded into the batch-norm shift).
    """

    def __init__(
        self, in_channels: int, filters: int, momentum: float, eps: float, pool: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(filters, momentum=momentum, eps=eps)
        self.stride = 1 if pool else 2
        # the block with the batch's statistics, and with given (running) ones
        self.functions = (conv_batch_norm_pool_relu, conv_normalise_pool_relu)
        if not pool:
            self.functions = (conv_batch_norm_relu, conv_normalise_relu)

    def forward(self, x: Tensor, batch_stats: bool) -> Tensor:
        norm, b, weight = self.norm, self.conv.bias, self.conv.weight
        assert norm.running_mean is not None and norm.running_var is not None and b is not None
        batch_block, given_block = self.functions
        if not batch_stats:
            # the running statistics collected on this episode's support set:
            # BN(x + b) = γ (x − μ_r) / σ_r + (β + γ b / σ_r)
            shift = norm.bias + norm.weight * b * torch.rsqrt(norm.running_var + norm.eps)
            mean, var = norm.running_mean, norm.running_var
            return given_block(x, weight, mean, var, norm.weight, shift, norm.eps)
        # this batch's statistics (b enters as a shift, which cancels: see above); the
        # episode's running ones are updated
        y, mean, var = batch_block(x, weight, b, norm.weight, norm.bias, norm.eps)
        # values per channel: the convolution's output is ⌈side / stride⌉ (padding 1)
        count = x.shape[0] * -(-x.shape[2] // self.stride) * -(-x.shape[3] // self.stride)
        momentum = norm.momentum if norm.momentum is not None else 0.1
        update_running_stats(norm.running_mean, norm.running_var, mean, var, count, momentum)
        return y


class ConvNet(nn.Module):
    """Conv-4 classifier as an ordinary module: 4 x [conv, BN, ReLU, pool] → linear (or 4 x
    [stride-2 conv, BN, ReLU] → mean over space → linear)."""

    def __init__(self, shape: LearnerShape, bn_momentum: float = 0.9, bn_eps: float = 1e-5) -> None:
        super().__init__()
        channels = [shape.channels] + [shape.filters] * 4
        self.pool = shape.downsample == "pool"
        self.blocks = nn.ModuleList(
            Block(c_in, c_out, bn_momentum, bn_eps, self.pool)
            for c_in, c_out in itertools.pairwise(channels)
        )
        self.head = nn.Linear(feature_dim(shape), shape.n_way)

    def features(self, x: Tensor, batch_stats: bool = True, episodes: int | None = None) -> Tensor:
        """Embedding [B, feature_dim] of images x [B, C, H, W]; with ``episodes`` E, of a batch
        of episodes x [B, E·C, H, W] (each episode a group of channels): [E, B, feature_dim]."""
        for block in self.blocks:
            x = block(x, batch_stats)  # [B, (E·)filters, side, side] after the last block
        if episodes is None:
            return x.flatten(1) if self.pool else x.mean((2, 3))
        x = x.unflatten(1, (episodes, -1)).transpose(0, 1)  # [E, B, filters, side, side]
        return x.flatten(2) if self.pool else x.mean((3, 4))

    def forward(
        self, x: Tensor, batch_stats: bool = True, head: bool = True, episodes: int | None = None
    ) -> Tensor:
        """Logits [B, N], or [E, B, N] for a batch of ``episodes`` (or the embedding when
        ``head`` is false); the head's weight [E·N, D] and bias [E·N] hold one layer per
        episode."""
        features = self.features(x, batch_stats, episodes)
        if not head:
            return features
        return linear_head(features, self.head.weight, self.head.bias, episodes)


def linear_head(
    features: Tensor, weight: Tensor, bias: Tensor, episodes: int | None = None
) -> Tensor:
    """The learner's output layer: logits [B, N] of ``features`` [B, D] with ``weight`` [N, D] and
    ``bias`` [N]; for a batch of ``episodes`` E, logits [E, B, N] of features [E, B, D] with one
    layer per episode, weight [E·N, D] and bias [E·N]."""
    if episodes is None:
        return product(features, weight.t(), bias)
    weight = weight.unflatten(0, (episodes, -1))  # [E, N, D]
    return product(features, weight.transpose(1, 2), bias.view(episodes, 1, -1))


def feature_side(image_size: int, downsample: str = "pool") -> int:
    """Spatial side of the last block's output: after four 2x2 max-pools (which drop an odd
    row), or four stride-2 convolutions with padding 1 (which keep it: ⌈side / 2⌉)."""
    side = image_size
    for _ in range(4):
        side = _halved(side, downsample)
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for 4 pooling layers")
    return side


def feature_dim(shape: LearnerShape) -> int:
    """Length of the embedding the linear head reads: the last feature map flattened (``pool``)
    or averaged over space (``stride``)."""
    if shape.downsample == "stride":
        return shape.filters
    return shape.filters * feature_side(shape.image_size) ** 2


class Learner:
    """The learner seen as a function of a flat parameter vector θ [n].

    Example::

        shape = LearnerShape(channels=1, image_size=28, n_way=5, filters=32)
        learner = Learner(shape)
        theta = learner.initial_theta()          # [n], PyTorch's default initialisation
        bn = learner.fresh_batchnorm_state()     # new running statistics for an episode
        logits = learner(theta, torch.rand(5, 1, 28, 28), bn)   # [5, 5]
    """

    def __init__(self, shape: LearnerShape, bn_momentum: float = 0.9, bn_eps: float = 1e-5) -> None:
        self.shape = shape
        self.net = ConvNet(shape, bn_momentum, bn_eps)
        named = list(self.net.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]

    @property
    def n_params(self) -> int:
        """n, the number of coordinates of θ (with a head of ``shape.n_way`` outputs)."""
        return sum(self.sizes)

    @property
    def n_body(self) -> int:
        """Coordinates of θ before the linear head (the conv-4 body): θ[:n_body]."""
        return sum(self.sizes[:-2])

    def with_head(self, theta: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """θ's body [n_body] followed by a linear head ``weight`` [N, D], ``bias`` [N].

        N may differ from ``shape.n_way``: every pass reads the head's size from θ's length, so
        one body serves episodes of any number of ways (a head built per episode). For a batch of
        episodes: θ [E, ≥ n_body], weight [E, N, D], bias [E, N] → [E, n].
        """
        return torch.cat([theta[..., : self.n_body], weight.flatten(-2), bias], dim=-1)

    def to(self, device: torch.device | str) -> Learner:
        self.net.to(device)
        return self

    def initial_theta(self) -> Tensor:
        """θ at the module's own initialisation, flattened: [n]."""
        return torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of the flat vector θ [n] with the shapes of the named parameters (the head's
        number of outputs read from θ's length, see :meth:`with_head`). For a batch of episodes,
        θ [E, n], each parameter [E·d_0, d_1, ...]: the episodes' tensors one after another
        along the first dimension, as grouped convolutions and :class:`ConvNet` read them."""
        sizes, shapes = self._layout(theta.shape[-1])
        chunks = theta.split(sizes, dim=-1)
        if theta.dim() == 1:
            return {n: c.view(s) for n, c, s in zip(self.names, chunks, shapes)}
        episodes = theta.shape[0]
        return {
            n: c.reshape(episodes * s[0], *s[1:]) for n, c, s in zip(self.names, chunks, shapes)
        }

    def _layout(self, n: int) -> tuple[list[int], list[torch.Size]]:
        if n == self.n_params:
            return self.sizes, self.shapes
        if n == self.n_body:  # the body alone (an initialisation whose head is built per episode)
            return self.sizes[:-2], self.shapes[:-2]
        features = self.shapes[-2][1]
        ways, rest = divmod(n - self.n_body, features + 1)
        if ways < 1 or rest:
            raise ValueError(f"θ of {n} coordinates does not fit this learner ({self.n_params})")
        head = [torch.Size((ways, features)), torch.Size((ways,))]
        return [*self.sizes[:-2], ways * features, ways], [*self.shapes[:-2], *head]

    def parameter_groups(self) -> list[tuple[str, slice]]:
        """(parameter name, slice of θ) for every parameter tensor, in θ's order."""
        groups, start = [], 0
        for name, size in zip(self.names, self.sizes):
            groups.append((name, slice(start, start + size)))
            start += size
        return groups

    def fresh_batchnorm_state(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        episodes: int = 1,
    ) -> BatchNormState:
        """Running statistics reset for a new episode (mean 0, variance 1), or for a batch of
        ``episodes`` ([E·C] per layer: each episode's channels one after another)."""
        state = {}
        for name, buffer in self.net.named_buffers():
            size, dtype_ = buffer.numel() * episodes, dtype or buffer.dtype
            if name.endswith("running_mean"):
                state[name] = torch.zeros(size, device=device or buffer.device, dtype=dtype_)
            elif name.endswith("running_var"):
                state[name] = torch.ones(size, device=device or buffer.device, dtype=dtype_)
        return state

    def __call__(
        self, theta: Tensor, x: Tensor, bn: BatchNormState | None = None, batch_stats: bool = True
    ) -> Tensor:
        """Logits [B, N] of images x [B, C, H, W] at parameters θ [n]; for a batch of E
        episodes, logits [E, B, N] of images [E, B, C, H, W] at θ [E, n].

        ``bn`` holds the episode's running statistics; they are updated in place when
        ``batch_stats`` is true (support passes) and used for normalisation when it is false.
        """
        return self._call(theta, x, bn, batch_stats=batch_stats, head=True)

    def features(
        self, theta: Tensor, x: Tensor, bn: BatchNormState | None = None, batch_stats: bool = True
    ) -> Tensor:
        """Embedding [B, feature_dim] before the linear head, at parameters θ ([E, B,
        feature_dim] for a batch of episodes, as :meth:`__call__`)."""
        return self._call(theta, x, bn, batch_stats=batch_stats, head=False)

    def _call(self, theta: Tensor, x: Tensor, bn: BatchNormState | None, **kwargs: bool) -> Tensor:
        """:class:`ConvNet` evaluated at θ through :func:`torch.func.functional_call`.

        On the CPU the images enter in NHWC memory order, where oneDNN's convolutions and
        PyTorch's max-pool are several times faster on these small batches than in NCHW.
        """
        if kwargs["head"] and theta.shape[-1] == self.n_body:
            raise ValueError("θ holds no linear head (see Learner.with_head)")
        episodes = None
        if theta.dim() == 2:  # a batch of episodes: [E, B, C, H, W] → [B, E·C, H, W]
            episodes = theta.shape[0]
            if x.dim() != 5 or x.shape[0] != episodes:
                raise ValueError(
                    f"θ of {episodes} episodes takes images [E, B, C, H, W], not {x.shape}"
                )
            x = x.transpose(0, 1).flatten(1, 2)
        if not bn:  # fresh statistics for this pass
            bn = self.fresh_batchnorm_state(x.device, x.dtype, episodes or 1)
        tensors = {**self.unflatten(theta), **bn}
        if x.device.type == "cpu" and x.dim() == 4:
            x = to_channels_last(x)
        arguments = {**kwargs, "episodes": episodes}
        # no tied weights to look for in ConvNet (the search cost ~60 us a pass)
        return functional_call(self.net, tensors, (x,), arguments, strict=False, tie_weights=False)


def register_batchnorm_buffers(module: nn.Module, learner: Learner, prefix: str) -> list[str]:
    """Give ``module`` buffers ``prefix + name`` holding fresh running statistics of every batch
    norm of ``learner`` (saved in checkpoints with the module); returns the learner's names, for
    :func:`batchnorm_buffers`."""
    state = learner.fresh_batchnorm_state()
    for name, value in state.items():
        module.register_buffer(prefix + name.replace(".", "_"), value)
    return list(state)


def batchnorm_buffers(module: nn.Module, names: list[str], prefix: str) -> BatchNormState:
    """The statistics :func:`register_batchnorm_buffers` registered, as a learner's batch-norm
    state (the buffers themselves: a pass with batch statistics updates them in place)."""
    return {name: getattr(module, prefix + name.replace(".", "_")) for name in names}


def to_channels_last(x: Tensor) -> Tensor:
    """x [B, C, H, W] in NHWC memory order, with strides that say so even when C = 1.

    For one channel NCHW and NHWC are the same bytes, but the convolution picks its output layout
    from the strides, and ``contiguous(memory_format=channels_last)`` keeps NCHW strides then.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1:
        _, _, h, w = x.shape
        x = x.as_strided(x.shape, (h * w, 1, w, 1))
    return x


def conv_sides(shape: LearnerShape) -> list[int]:
    """Spatial side of each of the four convolutions' outputs."""
    sides, side = [], shape.image_size
    for _ in range(4):
        sides.append(side if shape.downsample == "pool" else _halved(side, "stride"))
        side = _halved(side, shape.downsample)
    return sides


def _halved(side: int, downsample: str) -> int:
    """A block's output side: 2x2 max-pool drops an odd row, a stride-2 conv keeps it."""
    return side // 2 if downsample == "pool" else (side + 1) // 2


def conv_flops(shape: LearnerShape, batch: int) -> float:
    """Multiply-adds x 2 of one forward pass of the learner on ``batch`` images."""
    inputs = [shape.channels] + [shape.filters] * 3
    flops = sum(
        2 * batch * side * side * c_in * shape.filters * 9
        for side, c_in in zip(conv_sides(shape), inputs)
    )
    return flops + 2 * batch * feature_dim(shape) * shape.n_way
