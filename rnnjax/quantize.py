"""Weight-only int8 quantisation of a trained model's parameters, through qwix (``pip install qwix``).

Every floating-point weight matrix (``ndim >= 2``) is stored as a :class:`qwix.QArray`: int8 values and one
float32 scale per output channel (per row of a token embedding, the unit a lookup reads), symmetric absmax
calibration::

    w ≈ q * s,   q = round(w / s) in [-127, 127] int8,   s = max |w[:, j]| / 127   (w: (I, O), s: (1, O))

Biases, layer-norm parameters and other vectors stay float32. The streaming step dequantises inside its
compiled program and computes in float32 (weight-only: 4× less parameter memory, the same arithmetic on
weights that are each within ``s / 2`` of the original)::

    qparams = quantize_params(params)
    step = quantized_step(model)
    carry, y = step(qparams, model.initial_carry(1), x)                  # y: (1, O)
    param_bytes(params), param_bytes(qparams)                            # e.g. 4.0 MB -> 1.0 MB

qwix's own mechanism (``qwix.quantize_model`` with a ``PtqProvider``) intercepts the matmuls of Flax modules;
rnnjax's models are pure functions, not Flax modules, so this module uses qwix's array API
(``qwix.quantize`` / ``qwix.dequantize``) directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.types import Array, Carry, Params

EMBEDDING_KEYS = ("embed",)
"""Parameter names of token embeddings, quantised per row (axis 0) instead of per output column."""


def _is_qarray(leaf) -> bool:
    import qwix

    return isinstance(leaf, qwix.QArray)


def quantize_params(params: Params, *, min_size: int = 0) -> Params:
    """The parameter tree with every float matrix as an int8 :class:`qwix.QArray` (one scale per channel).

    Args:
        params: a model's parameters (float32).
        min_size: leave matrices with fewer elements than this in float32.

    Returns:
        The same tree with int8 ``QArray`` leaves (``qvalue`` int8, ``scale`` float32) in place of matrices.
    """
    import qwix

    def quantize(path, leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.size < min_size:
            return leaf
        names = [getattr(key, "key", None) for key in path]
        axis = 0 if names and names[-1] in EMBEDDING_KEYS else leaf.ndim - 1
        return qwix.quantize(leaf.astype(jnp.float32), jnp.int8, channelwise_axes=(axis,))

    return jax.tree_util.tree_map_with_path(quantize, params)


def dequantize_params(qparams: Params) -> Params:
    """Float32 parameters back from :func:`quantize_params` (each weight within half a scale step)."""
    import qwix

    return jax.tree.map(lambda leaf: qwix.dequantize(leaf) if _is_qarray(leaf) else leaf, qparams, is_leaf=_is_qarray)


def param_bytes(params: Params) -> int:
    """Bytes the arrays of a parameter tree occupy (int8 values and float32 scales of ``QArray`` leaves)."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(params)))


def quantized_step(model) -> Callable[[Params, Carry, Array], tuple[Carry, Array]]:
    """The model's streaming step on int8 weights: ``step(qparams, carry, x) -> (carry, y)``, jitted.

    The weights are dequantised inside the compiled step (XLA reads int8 from memory), then the model's own
    ``step`` runs in float32 on them.

    Args:
        model: a :class:`rnnjax.models.SequenceModel` whose core streams, or a
            :class:`rnnjax.attention.Transformer` (its carry is the key/value cache).

    Returns:
        A jitted function with the signature of ``model.step``, taking :func:`quantize_params` output.
    """
    return jax.jit(functools.partial(_quantized_step, model))


def _quantized_step(model, qparams: Params, carry: Carry, x) -> tuple[Carry, Array]:
    return model.step(dequantize_params(qparams), carry, x)
