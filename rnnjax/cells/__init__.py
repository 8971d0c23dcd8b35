"""Recurrent cells: frozen hyperparameters plus pure ``init`` / ``initial_carry`` / ``step``.

Importing this package imports every shipped cell, so :data:`CELLS` (the registry) is complete.
"""

from rnnjax.cells.base import Cell
from rnnjax.cells.deltanet import GatedDeltaNet, GatedDeltaNetState
from rnnjax.cells.gru import GRU, GRUState
from rnnjax.cells.lru import LRU, LRUState
from rnnjax.cells.lstm import LSTM, LSTMState
from rnnjax.cells.mamba2 import Mamba2, Mamba2State
from rnnjax.cells.minimal import MinGRU, MinGRUState, MinLSTM, MinLSTMState
from rnnjax.cells.mlstm import MLSTM, MLSTMState
from rnnjax.cells.registry import CELLS, add_cell, cell_factory, cell_names, make_cell, register_cell, remove_cell
from rnnjax.cells.rglru import RGLRU, GriffinBlock, GriffinState, RGLRUState
from rnnjax.cells.simple import JordanRNN, JordanState, SimpleRNN, SimpleRNNState
from rnnjax.cells.slstm import SLSTM, SLSTMState

__all__ = [
    "GatedDeltaNet",
    "GatedDeltaNetState",
    "Mamba2",
    "Mamba2State",
    "MLSTM",
    "MLSTMState",
    "RGLRU",
    "RGLRUState",
    "GriffinBlock",
    "GriffinState",
    "SLSTM",
    "SLSTMState",
    "CELLS",
    "Cell",
    "GRU",
    "GRUState",
    "JordanRNN",
    "JordanState",
    "LRU",
    "LRUState",
    "LSTM",
    "LSTMState",
    "MinGRU",
    "MinGRUState",
    "MinLSTM",
    "MinLSTMState",
    "SimpleRNN",
    "SimpleRNNState",
    "add_cell",
    "cell_factory",
    "cell_names",
    "make_cell",
    "register_cell",
    "remove_cell",
]
