"""Recurrent cells: frozen hyperparameters plus pure ``init`` / ``initial_carry`` / ``step``.

Importing this package imports every shipped cell, so :data:`CELLS` (the registry) is complete.
"""

from rnnjax.cells.base import Cell
from rnnjax.cells.gru import GRU, GRUState
from rnnjax.cells.lru import LRU, LRUState
from rnnjax.cells.lstm import LSTM, LSTMState
from rnnjax.cells.minimal import MinGRU, MinGRUState, MinLSTM, MinLSTMState
from rnnjax.cells.registry import CELLS, add_cell, cell_factory, cell_names, make_cell, register_cell, remove_cell
from rnnjax.cells.simple import JordanRNN, JordanState, SimpleRNN, SimpleRNNState

__all__ = [
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
