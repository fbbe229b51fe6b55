"""metalstm: few-shot image classification with the LSTM meta-learner of Ravi & Larochelle,
"Optimization as a Model for Few-Shot Learning" (ICLR 2017).

The map of the package follows the idea: data → episodes → learner → methods (registered in
:mod:`metalstm.registry`) → training → evaluation → reports. Quick use::

    from metalstm import load_preset, override, train, load_method, evaluate
    trainer = train(override(load_preset("omniglot-5w1s"), {"episodes": 500}), "runs/x")
    model, _ = load_method("runs/x/best")
    print(evaluate(model, episodes=100).line())
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it. Imported on first use (PEP 562), so that
#: ``import metalstm`` and the command line's first instants do not wait for torch: a Ctrl-C
#: while torch loads then reaches the CLI's handler (exit 130) instead of a traceback.
_EXPORTS = {
    "Method": "methods.base",
    "EpisodeLoss": "methods.base",
    "build_method": "methods",
    "register": "registry",
    "method_names": "registry",
    "MethodSettings": "registry",
    "TrainsOn": "registry",
    "Config": "config",
    "load_preset": "config",
    "override": "config",
    "preset_names": "config",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "MetaLSTMError": "errors",
    "EvalResult": "evaluation",
    "evaluate": "evaluation",
    "Learner": "learner",
    "LearnerShape": "learner",
    "MetaLearnerCell": "methods.metalearner",
    "MetaLSTM": "methods.metalearner",
    "preprocess": "methods.metalearner",
    "MetaLSTMOptimizer": "methods.metalearner.optimizer",
    "adapt": "predict",
    "predict": "predict",
    "load_method": "serialization",
    "Trainer": "training",
    "resume": "training",
    "train": "training",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metalstm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``metalstm.predict`` is the function, as it always was, even once the submodule of the
    same name is imported (the import system then binds the submodule to the package's name)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from .config import Config, load_preset, override, preset_names
    from .errors import CheckpointError, ConfigError, DataError, MetaLSTMError
    from .evaluation import EvalResult, evaluate
    from .learner import Learner, LearnerShape
    from .metalearner import MetaLearnerCell, MetaLSTM, preprocess
    from .methods import build_method
    from .methods.base import EpisodeLoss, Method
    from .optim import MetaLSTMOptimizer
    from .predict import adapt, predict
    from .serialization import load_method
    from .training import Trainer, resume, train

__all__ = [
    "ALGORITHMS",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "EpisodeLoss",
    "EvalResult",
    "Learner",
    "LearnerShape",
    "MetaLSTM",
    "MetaLSTMError",
    "MetaLSTMOptimizer",
    "MetaLearnerCell",
    "Method",
    "Trainer",
    "__version__",
    "adapt",
    "build_method",
    "evaluate",
    "load_method",
    "load_preset",
    "method_names",
    "override",
    "predict",
    "preprocess",
    "preset_names",
    "register",
    "resume",
    "train",
]
