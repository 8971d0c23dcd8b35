"""Recurrent cells: frozen hyperparameters plus pure ``init`` / ``initial_carry`` / ``step``."""

from rnnjax.cells.base import Cell
from rnnjax.cells.gru import GRU, GRUState
from rnnjax.cells.lru import LRU, LRUState
from rnnjax.cells.lstm import LSTM, LSTMState
from rnnjax.cells.minimal import MinGRU, MinGRUState, MinLSTM, MinLSTMState
from rnnjax.cells.simple import JordanRNN, JordanState, SimpleRNN, SimpleRNNState

__all__ = [
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
]
