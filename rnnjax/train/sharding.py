"""Data parallelism with ``jax.sharding``: one code path for one device, many devices and many hosts.

The recipe is the standard one for models that fit on a device::

    mesh = make_mesh()                          # a 1-D Mesh over every device of every process, axis "data"
    state = replicate(state, mesh)              # parameters and optimiser state: a full copy on each device
    batch = shard_batch(batch, mesh)            # the global batch split along its first axis
    state, metrics = train_step(state, batch)   # jit inserts the gradient all-reduce itself

Every process generates the same global batch (tasks are deterministic functions of the step) and places
only the rows its own devices hold, so the same code runs on several hosts once :func:`initialize` has been
called on each of them, before anything else touches JAX.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
):
    """Joins a multi-process job with ``jax.distributed.initialize`` (call it first, in every process).

    With no arguments JAX detects the cluster from the environment (SLURM, Open MPI, Kubernetes, Cloud TPU;
    ``JAX_COORDINATOR_ADDRESS`` may supply the address); otherwise pass the coordinator's ``host:port``
    (process 0 listens there), the number of processes and this process's id. ``local_device_ids`` restricts
    this process to some of its host's accelerators (SLURM's detection sets it to the task's local id).
    Afterwards ``jax.devices()`` lists the devices of all processes and :func:`make_mesh` spans them.

    Processes that compute on CPU exchange gradients through a cross-process CPU collective library: unless one
    was chosen already (``jax_cpu_collectives_implementation``), this selects Gloo, which needs nothing but
    TCP between the processes. The setting concerns the CPU backend only; GPUs and TPUs keep their own
    collectives (NCCL, ICI).

    ``jax.distributed.initialize`` raises if JAX was already used in this process or was initialised before.
    """
    use_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


def use_cpu_collectives(implementation: str = "gloo") -> None:
    """Selects the cross-process collectives of the CPU backend unless a choice was made already.

    Must run before the backend starts (:func:`initialize` calls it first). A no-op where JAX already
    defaults to a CPU collective implementation or the user set one.
    """
    if not getattr(jax.config, "jax_cpu_collectives_implementation", None):
        jax.config.update("jax_cpu_collectives_implementation", implementation)


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files meant to exist once (metrics, parameter files)."""
    return jax.process_index() == 0


def make_mesh(devices=None, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole by every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """The sharding of an array split along its first axis across ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(axis_name))


def _global_array(value, sharding: NamedSharding) -> jax.Array:
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = _global_array(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Places every array of ``tree`` (host or device values, equal on every process) whole on every device."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda leaf: _global_array(leaf, sharding), tree)


def shard_batch(batch, mesh: Mesh, axis_name: str = DATA_AXIS):
    """Splits every array of ``batch`` (the same global batch on every process) along its first axis.

    Raises:
        ValueError: if the batch size is not a multiple of the number of devices.
    """
    size = mesh.shape[axis_name]
    for leaf in jax.tree.leaves(batch):
        if np.shape(leaf)[0] % size:
            raise ValueError(
                f"the global batch size {np.shape(leaf)[0]} must be a multiple of the {size} devices of the mesh"
            )
    sharding = batch_sharded(mesh, axis_name)
    return jax.tree.map(lambda leaf: _global_array(leaf, sharding), batch)
