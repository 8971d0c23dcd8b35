"""Conversion to and from other frameworks.

:mod:`rnnjax.interop.torch` converts PyTorch's ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` modules and their states.
Importing this package does not import PyTorch; the functions import it when called.
"""

from rnnjax.interop.torch import from_torch, from_torch_state, to_torch, to_torch_state

__all__ = ["from_torch", "from_torch_state", "to_torch", "to_torch_state"]
