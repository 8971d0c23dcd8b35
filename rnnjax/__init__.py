"""rnnjax: recurrent sequence models as pure functions in JAX.

A cell is a frozen dataclass of hyperparameters with pure ``init``, ``initial_carry`` and ``step``;
:func:`unroll`, :class:`Bidirectional` and :class:`Stack` run cells over sequences; :func:`deer_unroll` runs a
nonlinear cell parallel in time by Newton's method (DEER).
"""

from rnnjax.cells import (
    GRU,
    LRU,
    LSTM,
    MLSTM,
    RGLRU,
    SLSTM,
    Cell,
    GatedDeltaNet,
    GatedDeltaNetState,
    GriffinBlock,
    GriffinState,
    GRUState,
    JordanRNN,
    JordanState,
    LRUState,
    LSTMState,
    Mamba2,
    Mamba2State,
    MinGRU,
    MinGRUState,
    MinLSTM,
    MinLSTMState,
    MLSTMState,
    RGLRUState,
    SimpleRNN,
    SimpleRNNState,
    SLSTMState,
    cell_names,
    make_cell,
    register_cell,
)
from rnnjax.deer import Deer, DeerInfo, deer_unroll
from rnnjax.layers import Bidirectional, BidirectionalState, Stack, StackState
from rnnjax.streaming import Streamer
from rnnjax.unrolling import masked_scan, reverse_sequences, unroll

__version__ = "0.1.0"

# Submodules with heavier dependencies (Flax NNX, Orbax, torch, datasets) load on first use, so that
# ``import rnnjax`` stays light: ``rnnjax.nnx.LSTM(...)`` works without importing ``rnnjax.nnx`` first.
_LAZY_SUBMODULES = (
    "attention",
    "bench",
    "checkpoint",
    "diagnostics",
    "export",
    "generation",
    "hopfield",
    "interop",
    "kernels",
    "linear_recurrence",
    "models",
    "nnx",
    "quantize",
    "seq2seq",
    "sequence_parallel",
    "tasks",
    "train",
)


# Functions of such submodules, re-exported here: ``rnnjax.generate`` is ``rnnjax.generation.generate``.
_LAZY_FUNCTIONS = {"generate": "generation", "beam_search": "generation"}


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"rnnjax.{name}")
    if name in _LAZY_FUNCTIONS:
        import importlib

        return getattr(importlib.import_module(f"rnnjax.{_LAZY_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'rnnjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | set(_LAZY_FUNCTIONS))


__all__ = [
    "GatedDeltaNet",
    "GatedDeltaNetState",
    "GriffinBlock",
    "GriffinState",
    "MLSTM",
    "MLSTMState",
    "Mamba2",
    "Mamba2State",
    "RGLRU",
    "RGLRUState",
    "SLSTM",
    "SLSTMState",
    "Bidirectional",
    "BidirectionalState",
    "Cell",
    "DeerInfo",
    "GRU",
    "GRUState",
    "JordanRNN",
    "JordanState",
    "LSTM",
    "LRU",
    "LRUState",
    "LSTMState",
    "MinGRU",
    "MinGRUState",
    "MinLSTM",
    "MinLSTMState",
    "SimpleRNN",
    "SimpleRNNState",
    "Stack",
    "StackState",
    "Streamer",
    "beam_search",
    "cell_names",
    "Deer",
    "deer_unroll",
    "generate",
    "make_cell",
    "masked_scan",
    "register_cell",
    "reverse_sequences",
    "unroll",
]
