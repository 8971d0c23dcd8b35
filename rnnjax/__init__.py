"""rnnjax: recurrent sequence models as pure functions in JAX.

A cell is a frozen dataclass of hyperparameters with pure ``init``, ``initial_carry`` and ``step``;
:func:`unroll`, :class:`Bidirectional` and :class:`Stack` run cells over sequences.
"""

from rnnjax.cells import (
    GRU,
    LSTM,
    Cell,
    GRUState,
    JordanRNN,
    JordanState,
    LSTMState,
    SimpleRNN,
    SimpleRNNState,
)
from rnnjax.layers import Bidirectional, BidirectionalState, Stack, StackState
from rnnjax.sequence import masked_scan, reverse_sequences, unroll

__version__ = "0.1.0"

__all__ = [
    "Bidirectional",
    "BidirectionalState",
    "Cell",
    "GRU",
    "GRUState",
    "JordanRNN",
    "JordanState",
    "LSTM",
    "LSTMState",
    "SimpleRNN",
    "SimpleRNNState",
    "Stack",
    "StackState",
    "masked_scan",
    "reverse_sequences",
    "unroll",
]
