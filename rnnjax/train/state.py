"""The training state: everything that changes during training, and nothing else."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnnjax.types import Array, Params, PRNGKey


class TrainState(NamedTuple):
    """A pytree holding the whole mutable state of a run; a checkpoint of it resumes the run exactly.

    Attributes:
        step: ``()`` int32, the number of updates applied so far. It is also the data position: the batch of
            step ``s`` is ``task.train_batch(s, batch_size)``.
        params: the model's parameters.
        opt_state: the Optax state of the optimiser.
        rng: a typed PRNG key (``jax.random.key``), split once per step for dropout.
        carry: the recurrent state carried across windows by truncated BPTT (``None`` otherwise).
    """

    step: Array
    params: Params
    opt_state: optax.OptState
    rng: PRNGKey
    carry: Any = None


def create_train_state(
    params: Params, optimizer: optax.GradientTransformation, rng: PRNGKey, carry: Any = None
) -> TrainState:
    """A state at step 0 with ``optimizer.init(params)``."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng, carry)


def host_state(state: TrainState) -> TrainState:
    """``state`` with every array fetched to host memory (NumPy; keys as key data), for comparisons."""
    return jax.device_get(state._replace(rng=jax.random.key_data(state.rng)))
