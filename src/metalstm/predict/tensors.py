"""The tensor API of prediction: load a trained model, adapt it to a support set given as
tensors, and label query tensors (:class:`FewShotClassifier`), with the checks of their shapes,
formats and labels. :mod:`.folders` reads the user's image folders into these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import SIZE_LIMITS
from ..errors import ConfigError, DataError
from ..inner_loop import episode_ways
from ..methods.base import Classifier, Method

BATCH_SIZE = 256  # query images per forward pass (each is labelled independently)


@dataclass
class FewShotClassifier:
    """A learner adapted to a support set of ``n_way`` classes.

    Calling it on images ``[B, C, H, W]`` returns logits ``[B, n_way]``; :meth:`probabilities`
    and :meth:`predict` give the softmax over those ``n_way`` classes and the arg-max labels.
    """

    classifier: Classifier
    n_way: int
    image_shape: tuple[int, int, int]
    device: torch.device
    batch_size: int | None = BATCH_SIZE

    def __call__(self, images: Tensor) -> Tensor:
        x = _as_images(images, self.image_shape, self.device, "query images")
        size = self.batch_size or len(x)
        with torch.no_grad():
            parts = [self.classifier(x[i : i + size]) for i in range(0, len(x), max(size, 1))]
        logits = torch.cat(parts) if parts else x.new_zeros(0, self.n_way)
        return logits[:, : self.n_way]  # N < N_train: only the outputs of the support labels

    def probabilities(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, n_way]`` (rows sum to 1)."""
        return torch.softmax(self(images).float(), dim=-1)

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels [B], probabilities [B, n_way])``."""
        probabilities = self.probabilities(images)
        return probabilities.argmax(-1), probabilities


def load_model(
    checkpoint: str | Path, *, steps: int | None = None, device: str | torch.device = "cpu"
) -> tuple[Method, dict[str, Any]]:
    """A trained model ready to adapt, and its checkpoint metadata.

    ``checkpoint`` is a ``.safetensors`` file, a run folder or a shipped name; ``steps`` overrides
    the number of inner steps at adaptation (default: as trained). Batch norm is set to the
    non-transductive protocol so that query images are labelled independently.
    """
    from ..serialization import load_method

    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps={steps!r} is invalid; give at least 1 inner step")
    # Evaluation-time settings only (read at adaptation time; the learner's shape is untouched).
    changes: dict[str, Any] = {"transductive": False}
    if steps is not None:
        changes["eval_inner_steps"] = steps
    return load_method(checkpoint, device=device, **changes)


def adapt(model: Method, support_x: Tensor, support_y: Tensor) -> FewShotClassifier:
    """Adapt the model's learner to a support set; return a :class:`FewShotClassifier`.

    ``support_x``: images ``[M, C, H, W]`` in the model's input format, float in [0, 1] or uint8
    (divided by 255); ``support_y``: integer labels ``[M]`` using every class 0..N-1 at least once,
    with 2 <= N <= :func:`max_ways` (the model's ``n_way``, or any N for a model whose head is
    built per episode). Any number of images per class works.

    Example::

        model, _ = load_model("runs/omniglot/best")
        classifier = adapt(model, support_x, support_y)
        labels, probabilities = classifier.predict(query_x)
    """
    config = model.config
    shape = (config.channels, config.image_size, config.image_size)
    device = model.device
    x = _as_images(support_x, shape, device, "support images")
    y = _check_labels(support_y, len(x), max_ways(model)).to(device)
    n_way = episode_ways(y)
    # A transductive model normalises with the query batch's statistics: never split the batch.
    batch_size = None if config.transductive else BATCH_SIZE
    return FewShotClassifier(model.adapt(x, y), n_way, shape, device, batch_size)


def predict(
    model: Method, support_x: Tensor, support_y: Tensor, query_x: Tensor
) -> tuple[Tensor, Tensor]:
    """Labels ``[Q]`` and class probabilities ``[Q, N]`` of ``query_x`` after adapting.

    See :func:`adapt` for the formats. Example::

        model, _ = load_model("runs/omniglot/best")
        labels, probabilities = predict(model, support_x, support_y, query_x)
    """
    return adapt(model, support_x, support_y).predict(query_x)


def _as_images(
    images: Tensor, shape: tuple[int, int, int], device: torch.device, what: str
) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"{what} must be a tensor [B, C, H, W], got {got}")
    if tuple(images.shape[1:]) != shape:
        raise DataError(
            f"{what} are {'x'.join(map(str, images.shape[1:]))} (CxHxW) but the model takes "
            f"{'x'.join(map(str, shape))}; convert them (the predict command does it for you)"
        )
    if images.dtype == torch.uint8:
        return images.to(device).float() / 255
    if not images.is_floating_point():
        raise DataError(f"{what} must be float in [0, 1] or uint8, got {images.dtype}")
    return images.to(device, torch.float32)


def _check_labels(labels: Tensor, count: int, max_way: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise DataError("support labels must be a 1-D integer tensor")
    if len(labels) != count:
        raise DataError(f"{count} support images but {len(labels)} labels; give one label each")
    if count == 0:
        raise DataError("the support set is empty; give at least one image per class")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise DataError("support labels must be 0..N-1; found a negative label")
    n_way = episode_ways(labels)
    missing = sorted(set(range(n_way)) - set(labels.tolist()))
    if missing:
        raise DataError(
            f"support labels must use every class 0..{n_way - 1}; class {missing[0]} has no image"
        )
    check_n_way(n_way, max_way, "the support labels")
    return labels


def max_ways(model: Method) -> int:
    """The most classes ``model`` tells apart: its ``n_way``, or for a model without an output
    layer of a fixed size (a head built per episode, a metric method) the config's limit."""
    return SIZE_LIMITS["n_way"] if model.any_ways() else model.config.n_way


def check_n_way(n_way: int, max_way: int, source: str) -> None:
    """Refuse ``n_way`` classes (found in ``source``) unless 2 <= n_way <= ``max_way``."""
    if n_way < 2:
        raise DataError(f"{source} have only {n_way} class; give at least 2 classes to tell apart")
    if n_way > max_way:
        raise DataError(
            f"{source} have {n_way} classes but the checkpoint supports at most {max_way} "
            f"(it was meta-trained {max_way}-way); use at most {max_way} classes or a checkpoint "
            f"trained with --set n_way={n_way}"
        )
