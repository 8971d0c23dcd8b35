"""Train several seeds (and learning rates) of one model on one task at once, with early stopping when solved.

:func:`train_seeds` trains ``M`` members of one model in one compiled program: the training state and the data
carry a member axis and ``jax.vmap`` maps the training step over it, and ``lax.scan`` runs ``eval_every`` steps
per call. A member is a model seed and a peak learning rate, so a multi-seed study and a learning-rate sweep are
the same call::

    from rnnjax import models, tasks, train

    task = tasks.get("adding", seq_len=100)
    model = models.build_model(task, "lstm", hidden_size=48)
    result = train.train_seeds(model, task, seeds=(0, 1, 2), steps=4000, eval_every=100,
                               optimizer=train.OptimizerConfig("adam", learning_rate=3e-3, warmup_steps=200,
                                                               decay_steps=3800))
    result.steps_to_solve        # (3,) first evaluation step at which each seed's valid mse <= 0.01, or -1
    result.final["test"]["mse"]  # (3,) test mse of each seed where training stopped

Member ``i`` with model seed ``s`` is ``fit(model, task, seed=s)``: the same initial parameters and dropout
keys, and the same training batches, those of data seed ``task.seed + 1000 * s`` (seed 0: the task's own
batches; every seed a different data order; :func:`rnnjax.train.loop.data_seed_of`). Evaluation splits are the
task's own and shared by all members. A member's update is that of ``fit`` with its peak learning rate (the
optimiser runs at peak 1 and its update is scaled by the member's rate, which is exact for Adam, AdamW and SGD
up to float rounding).

Early stopping: when the task defines when it counts as solved (:meth:`rnnjax.tasks.Task.is_solved`), each
member's steps-to-solve is the first evaluation step at which its ``monitor`` split (validation, never test)
meets the threshold, and the run stops once every member has solved; the final scores are taken where it
stopped. A member never solved has steps-to-solve ``-1``: "not solved in ``steps`` steps" is a result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from rnnjax.train.loop import DATA_SEED_STRIDE as DATA_SEED_STRIDE  # member seed s: task.seed + 1000 * s
from rnnjax.train.loop import training_task
from rnnjax.train.optim import OptimizerConfig
from rnnjax.train.state import TrainState, create_train_state
from rnnjax.train.step import make_train_step, model_loss_fn


class SeedsResult(NamedTuple):
    """What :func:`train_seeds` returns (``M`` members, ``P`` evaluation points).

    Attributes:
        params: the model's parameters where training stopped, every leaf with a leading ``(M,)`` axis.
        state: the final :class:`~rnnjax.train.TrainState` of every member (leading ``(M,)`` axis); its
            ``params`` and ``opt_state`` are over the flat parameter vector ``(M, N)`` (see ``unravel``).
        unravel: turns one member's flat vector ``(N,)`` back into the parameter pytree.
        seeds: ``(M,)`` model seeds.
        learning_rates: ``(M,)`` peak learning rates.
        steps: ``(P,)`` evaluation steps (multiples of ``eval_every``).
        curve: ``(P, M)`` the task's metric on the ``monitor`` split at each evaluation step.
        train_loss: ``(P, M)`` the mean training loss over the ``eval_every`` steps before each point.
        steps_to_solve: ``(M,)`` the first evaluation step at which each member's ``monitor`` metric counted as
            solved, ``-1`` where it never did (or where the task defines no threshold).
        threshold: the solve threshold of the ``monitor`` split (``None``: the task defines none).
        final: split -> metric -> ``(M,)`` scores where training stopped, for every split of ``final_splits``.
        stopped_at: the step training stopped at (``steps``, or earlier once every member solved).
        compile_seconds: wall time of compiling the training chunk and the evaluation.
        train_seconds: wall time of the training and evaluation calls, compilation excluded.
    """

    params: Any
    state: TrainState
    unravel: Callable
    seeds: np.ndarray
    learning_rates: np.ndarray
    steps: np.ndarray
    curve: np.ndarray
    train_loss: np.ndarray
    steps_to_solve: np.ndarray
    threshold: float | None
    final: dict[str, dict[str, np.ndarray]]
    stopped_at: int
    compile_seconds: float
    train_seconds: float

    @property
    def solved(self) -> np.ndarray:
        """``(M,)`` bool: whether each member solved the task."""
        return self.steps_to_solve >= 0


def reported_metrics(task) -> tuple[str, ...]:
    """The task's headline metric and its ``secondary_metrics``."""
    return (task.metric, *getattr(task, "secondary_metrics", ()))


def metrics_fn(model, task) -> Callable[[Any, Any], dict[str, jax.Array]]:
    """``metrics(params, batch) -> {name: scalar}`` for the task's reported metrics (no dropout).

    For seq2seq tasks (``task.seq2seq``) the decoded metrics (``exact_match``, ``token_accuracy``) come from
    greedy decoding of ``task.target_len`` steps; the others from ``model.loss_and_metrics``.
    """
    from rnnjax.seq2seq import decode_metrics

    names = reported_metrics(task)
    seq2seq = getattr(task, "seq2seq", False)

    def metrics(params, batch):
        _, values = model.loss_and_metrics(params, batch, task.kind)
        if seq2seq:
            tokens = model.greedy_decode(params, batch.inputs, lengths=batch.lengths, num_steps=task.target_len)
            values = {**values, **decode_metrics(tokens, batch.targets, batch.mask)}
        return {name: values[name] for name in names}

    return metrics


def member_optimizer(optimizer: OptimizerConfig) -> optax.GradientTransformation:
    """``optimizer`` at peak learning rate 1, followed by a scale whose value lives in the optimiser state.

    Every member of :func:`train_seeds` shares this transformation; :func:`set_learning_rate` writes a
    member's peak learning rate into its state, so members with different rates run in one ``vmap``.
    """
    unit = dataclasses.replace(optimizer, learning_rate=1.0)
    return optax.chain(unit.build(), optax.inject_hyperparams(optax.scale)(step_size=1.0))


def set_learning_rate(opt_state, learning_rate) -> Any:
    """The :func:`member_optimizer` state ``opt_state`` with its peak learning rate set to ``learning_rate``."""
    inner, scale = opt_state
    hyperparams = {**scale.hyperparams, "step_size": jnp.asarray(learning_rate, jnp.float32)}
    return (inner, scale._replace(hyperparams=hyperparams))


def member_task(task, seed: int):
    """The task whose training batches member seed ``seed`` trains on, as ``fit(model, task, seed=seed)``."""
    return training_task(task, int(seed))


def stack_trees(trees: Sequence) -> Any:
    """Stacks matching pytrees of host arrays along a new leading axis (``None`` leaves stay ``None``)."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def _check_arguments(task, seeds, learning_rates, steps, batch_size, eval_every, monitor, final_splits):
    if len(seeds) == 0:
        raise ValueError("seeds must name at least one model seed, got an empty sequence")
    if not all(isinstance(s, int | np.integer) and 0 <= s < 2**32 for s in seeds):
        raise ValueError(f"seeds must be integers in [0, 2**32), got {list(seeds)}")
    if learning_rates is not None:
        if len(learning_rates) != len(seeds):
            raise ValueError(f"learning_rates must hold one rate per seed ({len(seeds)}), got {len(learning_rates)}")
        if not all(np.isfinite(lr) and lr > 0 for lr in learning_rates):
            raise ValueError(f"learning_rates must be positive and finite, got {list(learning_rates)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if steps % eval_every:
        raise ValueError(f"steps ({steps}) must be a multiple of eval_every ({eval_every})")
    for split in (monitor, *final_splits):
        task.check_split(split)


def train_seeds(
    model,
    task,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int,
    batch_size: int = 32,
    optimizer: OptimizerConfig | None = None,
    learning_rates: Sequence[float] | None = None,
    eval_every: int = 100,
    monitor: str = "valid",
    stop_when_solved: bool | Callable[[np.ndarray], bool] = True,
    final_splits: Sequence[str] | None = None,
    compiler_options: dict | None = None,
    on_eval: Callable[[int, np.ndarray], None] | None = None,
) -> SeedsResult:
    """Trains one member per entry of ``seeds`` (each with its own learning rate) at once; stops when solved.

    Args:
        model: anything with ``init(key)`` and ``loss_and_metrics(params, batch, kind, dropout_key=...)`` (and
            ``greedy_decode`` for seq2seq tasks), e.g. :class:`rnnjax.models.SequenceModel`.
        task: a :class:`rnnjax.tasks.Task`.
        seeds: ``M`` model seeds, one per member (repeat a seed to give it several learning rates).
        steps: the step budget: optimiser updates per member unless every member solves earlier.
        batch_size: sequences per step and member.
        optimizer: the optimiser and its schedule (default ``OptimizerConfig()``: Adam at 1e-3, clipping at 1).
        learning_rates: ``M`` peak learning rates, one per member (default: ``optimizer.learning_rate`` for all).
        eval_every: steps between evaluations of the ``monitor`` split (the learning curve and the solve check);
            ``steps`` must be a multiple of it.
        monitor: the split that drives the curve and early stopping (validation: never select on test).
        stop_when_solved: stop once every member has solved (:meth:`~rnnjax.tasks.Task.is_solved` on
            ``monitor``); ``False`` trains the whole budget and still records steps-to-solve; or a function
            ``stop(steps_to_solve) -> bool`` of the ``(M,)`` steps-to-solve so far (``-1``: not yet), checked
            after every evaluation (a sweep stops once any learning rate has solved with every seed).
        final_splits: splits scored where training stopped (default: every split of the task).
        compiler_options: XLA options for compiling the training chunk (``jax.stages.Lowered.compile``).
        on_eval: called as ``on_eval(step, curve_point)`` after every evaluation, ``curve_point`` ``(M,)``.

    Returns:
        A :class:`SeedsResult`.

    Raises:
        ValueError: an argument is out of range (named in the message).
    """
    final_splits = tuple(task.splits if final_splits is None else final_splits)
    _check_arguments(task, list(seeds), learning_rates, steps, batch_size, eval_every, monitor, final_splits)
    seeds = [int(s) for s in seeds]
    optimizer = OptimizerConfig() if optimizer is None else optimizer
    if learning_rates is None:
        learning_rates = [optimizer.learning_rate] * len(seeds)
    M, K = len(seeds), int(eval_every)

    # The optimiser sees the parameters as one flat vector (N,): Adam and clipping are elementwise or global,
    # so the numbers are those of the pytree, but the compiled update is a handful of ops instead of a few per
    # leaf, which halves the compile time of small models.
    template = jax.eval_shape(model.init, jax.random.key(0))
    _, unravel = ravel_pytree(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), template))
    loss_fn = model_loss_fn(model, task.kind)
    tx = member_optimizer(optimizer)
    train_step = make_train_step(lambda flat, batch, key: loss_fn(unravel(flat), batch, key), tx, jit=False)
    metrics = metrics_fn(model, task)

    def init(seed, learning_rate):  # as rnnjax.train.initial_state: parameters and step keys from one seed
        init_key, train_key = jax.random.split(jax.random.key(seed))
        state = create_train_state(ravel_pytree(model.init(init_key))[0], tx, train_key)
        return state._replace(opt_state=set_learning_rate(state.opt_state, learning_rate))

    def train_chunk(states, batches):  # batches: leaves (K, M, B, ...)
        def body(states, batch):
            states, step_metrics = jax.vmap(train_step)(states, batch)
            return states, step_metrics["loss"]  # (M,)

        states, losses = jax.lax.scan(body, states, batches)  # losses: (K, M)
        return states, jnp.mean(losses, axis=0)  # (M,)

    @jax.jit
    def evaluate(flats, batch):  # flats: (M, N); the batch is shared
        return jax.vmap(lambda flat: metrics(unravel(flat), batch))(flats)  # name -> (M,)

    member_tasks = [member_task(task, s) for s in seeds]

    def chunk_batches(chunk: int):
        return stack_trees(
            [stack_trees([t.train_batch(s, batch_size) for t in member_tasks]) for s in range(chunk * K, chunk * K + K)]
        )

    start = time.perf_counter()
    seeds_array = jnp.asarray(seeds, jnp.uint32)
    rates = jnp.asarray(learning_rates, jnp.float32)
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # run once
    states = jax.jit(jax.vmap(init)).lower(seeds_array, rates).compile(compiler_options=fast)(seeds_array, rates)
    batches = chunk_batches(0)
    train_compiled = jax.jit(train_chunk).lower(states, batches).compile(compiler_options)
    monitor_batch = task.eval_batch(monitor)
    evaluate_compiled = evaluate.lower(states.params, monitor_batch).compile()
    compile_seconds = time.perf_counter() - start

    threshold = task.solve_threshold(monitor) if hasattr(task, "solve_threshold") else None
    steps_to_solve = np.full((M,), -1, np.int64)
    curve_steps, curve, losses = [], [], []
    train_seconds, done = 0.0, 0
    for chunk in range(steps // K):
        start = time.perf_counter()
        states, loss = train_compiled(states, batches)
        done = (chunk + 1) * K
        if done < steps:
            batches = chunk_batches(chunk + 1)  # on the host while the device trains (dispatch is asynchronous)
        losses.append(np.asarray(loss, np.float64))  # (M,) waits for the chunk
        point = np.asarray(evaluate_compiled(states.params, monitor_batch)[task.metric], np.float64)  # (M,)
        train_seconds += time.perf_counter() - start
        curve_steps.append(done)
        curve.append(point)
        if threshold is not None:
            newly = (steps_to_solve < 0) & np.array([task.is_solved(v, monitor) for v in point])
            steps_to_solve[newly] = done
        if on_eval is not None:
            on_eval(done, point)
        if threshold is not None:
            if callable(stop_when_solved):
                stop = stop_when_solved(steps_to_solve.copy())
            else:
                stop = stop_when_solved and bool(np.all(steps_to_solve >= 0))
            if stop:
                break

    start = time.perf_counter()
    final: dict[str, dict[str, np.ndarray]] = {}
    for split in final_splits:
        batch = task.eval_batch(split)
        scored = evaluate_compiled if _same_shapes(batch, monitor_batch) else evaluate
        final[split] = {k: np.asarray(v, np.float64) for k, v in scored(states.params, batch).items()}
    final_seconds = time.perf_counter() - start
    return SeedsResult(
        params=jax.vmap(unravel)(states.params),
        state=states,
        unravel=unravel,
        seeds=np.asarray(seeds),
        learning_rates=np.asarray(learning_rates, np.float64),
        steps=np.asarray(curve_steps, np.int64),
        curve=np.stack(curve),
        train_loss=np.stack(losses),
        steps_to_solve=steps_to_solve,
        threshold=threshold,
        final=final,
        stopped_at=done,
        compile_seconds=compile_seconds,
        train_seconds=train_seconds + final_seconds,
    )


def _same_shapes(a, b) -> bool:
    shapes = lambda tree: [(np.shape(x), np.asarray(x).dtype) for x in jax.tree.leaves(tree)]  # noqa: E731
    return jax.tree.structure(a) == jax.tree.structure(b) and shapes(a) == shapes(b)
