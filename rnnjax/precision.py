"""Mixed precision shared by cells and kernels: 16-bit compute dtypes accumulate in float32."""

from __future__ import annotations

import jax.numpy as jnp

from rnnjax.types import Array, DType


def accumulation_dtype(dtype: DType) -> DType:
    """The dtype matmuls accumulate in: float32 for 16-bit compute dtypes, else ``dtype`` itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def matmul(x: Array, w: Array, compute_dtype: DType) -> Array:
    """``x @ w`` with both operands cast to ``compute_dtype``, accumulated in :func:`accumulation_dtype`.

    Args:
        x: ``(*B, K)``.
        w: ``(K, N)``.
        compute_dtype: dtype of the multiplication (e.g. bfloat16).

    Returns:
        ``(*B, N)`` in the accumulation dtype (float32 for bfloat16 compute).
    """
    acc = accumulation_dtype(compute_dtype)
    return jnp.matmul(x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=acc)
