"""Array type aliases and the shape-letter legend used across rnnjax.

Shape letters, used in every docstring and shape comment:

* ``B`` — batch; ``*B`` means any number of leading batch axes, including none.
* ``T`` — time (sequence length).
* ``I`` — input features.
* ``H`` — hidden units of a cell.
* ``P`` — projected hidden size (LSTM with ``proj_size``).
* ``O`` — output features of a cell or layer.
* ``G`` — stacked gates (``4H`` for an LSTM, ``3H`` for a GRU).
"""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array
"""Any JAX array."""

PRNGKey = jax.Array
"""A key from ``jax.random.key`` (or a legacy ``uint32[2]`` key)."""

Params = Any
"""A pytree of arrays (nested dicts with stable string keys)."""

Carry = Any
"""A cell's recurrent state: a NamedTuple of arrays with shape ``(*B, ...)``."""

DType = Any
"""Anything ``jnp.dtype`` accepts."""
