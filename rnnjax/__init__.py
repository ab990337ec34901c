"""rnnjax: exact, fast recurrent networks with a bias-free ReLU cell, in JAX and Flax."""

from rnnjax import bptt, data, devices, recipes, sweep, train
from rnnjax.cell import ReLUCell
from rnnjax.models import L1Norm, L1NormLearned, RunningCount
from rnnjax.recurrence import rnn

__all__ = ["ReLUCell", "rnn", "L1Norm", "L1NormLearned", "RunningCount", "bptt", "data", "devices",
           "recipes", "sweep", "train"]
__version__ = "0.1.0"
