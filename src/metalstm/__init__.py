"""metalstm: few-shot image classification with the LSTM meta-learner of Ravi & Larochelle,
"Optimization as a Model for Few-Shot Learning" (ICLR 2017).

The map of the package follows the idea: data → episodes → learner → meta-learner → training →
evaluation → reports. Quick use::

    from metalstm import load_preset, override, train, load_algorithm, evaluate
    trainer = train(override(load_preset("omniglot-5w1s"), {"episodes": 500}), "runs/x")
    model, _ = load_algorithm("runs/x/best")
    print(evaluate(model, episodes=100).line())
"""

__version__ = "0.1.0"

from .algorithm import Algorithm, EpisodeLoss
from .algorithms import ALGORITHMS, build_algorithm
from .config import Config, load_preset, override, preset_names
from .errors import CheckpointError, ConfigError, DataError, MetaLSTMError
from .evaluation import EvalResult, evaluate
from .learner import Learner, LearnerShape
from .metalearner import MetaLearnerCell, MetaLSTM, preprocess
from .optim import MetaLSTMOptimizer
from .predict import adapt, predict
from .serialization import load_algorithm
from .training import Trainer, resume, train

__all__ = [
    "ALGORITHMS",
    "Algorithm",
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
    "Trainer",
    "__version__",
    "adapt",
    "build_algorithm",
    "evaluate",
    "load_algorithm",
    "load_preset",
    "override",
    "predict",
    "preprocess",
    "preset_names",
    "resume",
    "train",
]
