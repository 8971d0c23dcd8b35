"""The cell protocol, and the precision and initialisation helpers every cell shares.

A cell is a frozen, hashable dataclass that holds only hyperparameters, with three pure methods::

    params = cell.init(key, input_size)                 # a pytree of arrays with documented names
    carry = cell.initial_carry(batch_shape, dtype)     # a NamedTuple, leaves (*B, ...)
    carry, y = cell.step(params, carry, x)             # x: (*B, I) -> y: (*B, O); lax.scan order

and two declarations that tools read instead of guessing:

* ``output_field`` (or :meth:`Cell.readout`): how ``y`` is read off the carry that ``step`` returns;
* :meth:`Cell.recurrent_matrices`: its state-to-state weight matrices, by name.

:meth:`Cell.sequence`, the method :func:`rnnjax.unroll` calls, steps the cell with
:func:`rnnjax.masked_scan`; a cell may override it with a whole-sequence fast path, which must give the same
numbers (the conformance suite checks every registered cell).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from rnnjax import _checks
from rnnjax.precision import accumulation_dtype
from rnnjax.protocol import SequenceCore
from rnnjax.types import Array, Carry, DType, Params, PRNGKey
from rnnjax.unrolling import masked_scan

Initializer = Callable[[PRNGKey, Sequence[int], DType], Array]
InitializerName = Literal[
    "orthogonal", "glorot_uniform", "glorot_normal", "lecun_uniform", "lecun_normal", "he_uniform", "he_normal", "zeros"
]
Activation = Literal["tanh", "relu", "sigmoid", "identity"]

_NAMED_INITIALIZERS: dict[str, Callable[[], Initializer]] = {
    "orthogonal": jax.nn.initializers.orthogonal,
    "glorot_uniform": jax.nn.initializers.glorot_uniform,
    "glorot_normal": jax.nn.initializers.glorot_normal,
    "lecun_uniform": jax.nn.initializers.lecun_uniform,
    "lecun_normal": jax.nn.initializers.lecun_normal,
    "he_uniform": jax.nn.initializers.he_uniform,
    "he_normal": jax.nn.initializers.he_normal,
    "zeros": lambda: jax.nn.initializers.zeros,
}

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def resolve_initializer(init: str | Initializer, name: str) -> Initializer:
    """Turns an initialiser name (``"orthogonal"``, ``"glorot_uniform"``, ...) or callable into a callable.

    16-bit parameters are drawn in float32 and then rounded: ``"orthogonal"`` needs a QR decomposition,
    which has no bfloat16 kernel.
    """
    if not callable(init):
        _checks.check_choice(init, tuple(_NAMED_INITIALIZERS), name)
        init = _NAMED_INITIALIZERS[init]()

    def initializer(key: PRNGKey, shape: Sequence[int], dtype: DType) -> Array:
        return init(key, shape, accumulation_dtype(dtype)).astype(dtype)

    return initializer


def init_blocks(init: Initializer, key: PRNGKey, rows: int, cols: int, blocks: int, dtype: DType) -> Array:
    """Initialises a ``(rows, blocks * cols)`` matrix as ``blocks`` independent ``(rows, cols)`` blocks.

    Gate matrices are initialised block by block so that, for example, each of an LSTM's four recurrent
    blocks is orthogonal on its own (an orthogonal ``(H, 4H)`` matrix would not make each gate orthogonal).
    """
    keys = jax.random.split(key, blocks)
    return jnp.concatenate([init(k, (rows, cols), dtype) for k in keys], axis=-1)


class Cell(SequenceCore):
    """Base class of the cell protocol (see the module docstring).

    Subclasses are ``@dataclasses.dataclass(frozen=True, kw_only=True)`` holding only hyperparameters, so a
    cell is hashable and can be a static argument of ``jax.jit``. They must set ``hidden_size``,
    ``param_dtype`` and ``dtype`` fields, and register themselves with :func:`rnnjax.register_cell`.
    """

    hidden_size: int
    param_dtype: DType
    dtype: DType | None

    output_field: ClassVar[str | None] = None
    """The carry field that ``step`` outputs as ``y`` (``"h"``, ...); ``None``: the cell overrides :meth:`readout`."""

    @property
    def output_size(self) -> int:
        """``O``, the size of ``y`` that :meth:`step` returns."""
        return self.hidden_size

    @abc.abstractmethod
    def step(self, params: Params, carry: Carry, x: Array) -> tuple[Carry, Array]:
        """One time step: ``x`` ``(*B, I)`` -> ``(carry, y)`` with ``y`` ``(*B, O)``."""

    def sequence(
        self,
        params: Params,
        carry: Carry,
        xs: Array,
        mask: Array | None,
        *,
        unroll: int | bool = 1,
        remat: bool | int = False,
        dropout_key: PRNGKey | None = None,
    ) -> tuple[Carry, Array]:
        """Steps the cell over time-major ``xs`` ``(T, *B, I)`` with :func:`rnnjax.masked_scan`.

        Cells with a whole-sequence fast path override this; ``dropout_key`` is unused by cells.
        """
        del dropout_key
        return masked_scan(self.step, params, carry, xs, mask, unroll=unroll, remat=remat)

    @property
    def can_stream(self) -> bool:
        return True

    def readout(self, params: Params, carry: Carry, x: Array) -> Array:
        """The output ``y`` ``(*B, O)`` of the step that produced ``carry`` from input ``x``.

        Diagnostics perturb the carry and read the output again through this. The default reads the declared
        :attr:`output_field`; a cell whose output is computed from its state (the LRU's ``Re(C h) + D x``)
        overrides it.
        """
        del params, x
        if self.output_field is None:
            raise TypeError(
                f"{type(self).__name__} declares no output_field and does not override readout: set output_field "
                "to the carry field that step outputs, or define readout(params, carry, x)"
            )
        return getattr(carry, self.output_field)

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """The cell's state-to-state weight matrices by name (``{}`` for a cell without any).

        Read by :func:`rnnjax.diagnostics.spectral_stats`.
        """
        raise TypeError(f"{type(self).__name__} does not declare recurrent_matrices(params)")

    # Helpers for subclasses.

    def compute_dtype(self, params: Params) -> DType:
        """The dtype of matmuls: ``self.dtype`` if set, else the dtype the parameters are stored in."""
        if self.dtype is not None:
            return jnp.dtype(self.dtype)
        return jax.tree.leaves(params)[0].dtype

    def check_step_input(self, params: Params, x, carry=None) -> Array:
        """Validates one step's ``params``, input ``x`` ``(*B, I)`` (and ``carry``, when given); returns ``x``.

        The parameters must have the keys and shapes of ``init(key, I)`` (:func:`rnnjax._checks.check_core_params`)
        and the carry the structure and leaf shapes of ``initial_carry(B)``. The checks read only shapes and
        dtypes, so under ``jit`` (and inside a scan, which traces ``step`` once) they cost nothing at run time.
        """
        x = _checks.as_float_array(x, "x")
        _checks.check_rank(x, "x", 1, "(*batch, input_size)")
        _checks.check_core_params(self, params, x.shape[-1])
        _checks.check_features(x, self.input_size(params), "x")
        if carry is not None:
            _checks.check_carry(carry, _checks.carry_template(self, x.shape[:-1]), "carry")
        return x

    def check_hyperparameters(self) -> None:
        """Validates the shared fields; subclasses call this from ``__post_init__``."""
        _checks.check_positive_int(self.hidden_size, "hidden_size")
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if value is None and name == "dtype":
                continue
            try:
                dtype = jnp.dtype(value)
            except TypeError as error:
                raise TypeError(f"{name} must be a dtype, got {value!r}") from error
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"{name} must be a floating-point dtype, got {dtype}")


def batch_shape_tuple(batch_shape: Sequence[int] | int) -> tuple[int, ...]:
    """Normalises ``batch_shape`` (an int or a sequence of ints) to a tuple."""
    if isinstance(batch_shape, int):
        return (batch_shape,)
    return tuple(int(b) for b in batch_shape)


def keep_dtype(new: Carry, old: Carry) -> Carry:
    """Casts each leaf of ``new`` to the dtype of the matching leaf of ``old`` (scan carries keep dtypes)."""
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)
