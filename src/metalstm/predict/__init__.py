"""Few-shot classification of your own images with a trained meta-learner.

A practitioner has N kinds of things and K labelled photos of each, and wants labels for many
more. :func:`predict_folders` (the ``metalstm predict`` command) reads a *support* folder with one
sub-folder per class (the folder name is the label), brings every image to the checkpoint's input
format, lets the meta-learner train the learner on the support set (its T inner steps, exactly as
at meta-test time) and labels each query image with class probabilities.

Python API, on tensors::

    from metalstm.predict import adapt, load_model, predict

    model, _ = load_model("runs/omniglot/best")          # path, run folder or shipped name
    # support_x: float [N*K, C, H, W] in [0, 1] (or uint8); support_y: int [N*K] in 0..N-1
    labels, probabilities = predict(model, support_x, support_y, query_x)
    classifier = adapt(model, support_x, support_y)      # adapt once, label many batches
    labels, probabilities = classifier.predict(more_query_x)

Decisions (and why)
-------------------
* **Fewer classes than trained (N < N_train) are accepted; more are refused.** The learner's last
  layer has N_train outputs. The support labels 0..N-1 use its first N outputs; adaptation is the
  unchanged meta-learned procedure (the meta-learner only ever sees a support set whose labels
  happen to leave N_train - N outputs unused, and it pushes those down), and the probabilities
  are the softmax over the first N logits only, i.e. the learner's class probabilities given that
  the image belongs to one of the N support classes. With N > N_train there is no output for the
  extra classes; the message names the N the checkpoint supports. N = 1 is refused (nothing to
  tell apart).
* **Any K, and unequal K per class, are accepted.** The meta-learner is coordinate-wise: the
  support set only changes the learner's loss and gradient (the mean over all support images, one
  batch, as in meta-training), never a shape. With unequal K that mean weighs each class by its
  number of images, like any class-imbalanced training set; the command says so on stderr.
* **Inversion.** Omniglot checkpoints were meta-trained on inverted drawings (strokes 1 on a
  black background). ``--invert auto`` (the default) inverts when the checkpoint was trained on
  inverted images (``dataset: omniglot``) *and* the support images are light on average (mean
  intensity > 0.5, i.e. dark-on-light drawings); checkpoints trained on photos are never inverted
  automatically. ``yes`` / ``no`` force it. The decision and its reason go to stderr and apply to
  the support and query images alike.
* **Each query image is labelled on its own.** Batch norm uses the statistics of the support
  passes (the authors' non-transductive protocol), whatever the checkpoint's ``transductive``
  setting, so a label never depends on which other images are in the query.
* **True labels** of query images are known when the folder that directly holds an image is named
  like a support class (``query/CLASS/img.png``). They add a ``truth`` column to the table, the
  CSV and the JSON rows (empty / null for images whose folder names no class), an accuracy line,
  and, in ``--visualize``, green and red marks; with a flat query folder none of these appear.
* Images of any size and mode are converted by the project's one decoder
  (:func:`metalstm.data.images.decode_image`): grayscale or RGB as the checkpoint was trained,
  resized to its image size.

The package follows these seams: :mod:`.tensors` (the tensor API and its input checks),
:mod:`.folders` (the user's folders, their checks, the inversion decision) and :mod:`.rendering`
(table, summary, grid); the command itself is :mod:`metalstm.commands.predict`.
"""

from __future__ import annotations

from .folders import PredictionResult, predict_folders
from .tensors import FewShotClassifier, adapt, load_model, predict

__all__ = [
    "FewShotClassifier",
    "PredictionResult",
    "adapt",
    "load_model",
    "predict",
    "predict_folders",
]
