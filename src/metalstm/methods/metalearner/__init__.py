"""The meta-learner LSTM (Ravi & Larochelle 2017): kernels, cell, method, optimizer, ablation.

* :mod:`.kernels`: one inner step of both LSTM layers as one autograd node;
* :mod:`.native`: the same step as native code, built on first use where a C++ compiler exists;
* :mod:`.cell`: :class:`MetaLearnerCell`, the learned update rule (``init``, ``update``);
* :mod:`.method`: :class:`MetaLSTM`, the method registered as ``lstm``;
* :mod:`.optimizer`: :class:`MetaLSTMOptimizer`, the learned rule as a ``torch.optim`` optimizer;
* :mod:`.ablation`: plain SGD from the learned initialisation, on the same episodes.
"""

from .cell import CellState, MetaLearnerCell
from .kernels import preprocess
from .method import LSTMSettings, MetaLSTM
from .native import step_kernels

__all__ = ["CellState", "LSTMSettings", "MetaLSTM", "MetaLearnerCell", "preprocess", "step_kernels"]
