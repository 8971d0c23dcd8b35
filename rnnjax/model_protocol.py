"""The model protocol :mod:`rnnjax.train` relies on: :class:`TaskModel`, and :class:`ScoredModel` that provides it.

Every model family (:class:`rnnjax.models.SequenceModel`, :class:`rnnjax.attention.Transformer`, the seq2seq
models of :mod:`rnnjax.seq2seq`) is a frozen dataclass with pure methods::

    params = model.init(key)
    outputs = model.apply(params, batch.inputs, lengths=batch.lengths)          # (B, O) or (B, T, O)
    loss, metrics = model.loss_and_metrics(params, batch, kind)                 # what training and evaluation use

``loss_and_metrics`` is the whole interface training needs. :class:`ScoredModel` defines it once for all
families: it scores the outputs of :meth:`ScoredModel.outputs_to_score` with :func:`rnnjax.metrics.compute_metrics`;
a family whose training outputs are not plain ``apply`` (teacher forcing in seq2seq) overrides only that method.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

from rnnjax import _checks
from rnnjax.metrics import compute_metrics
from rnnjax.tasks.base import Batch
from rnnjax.types import Array, Params, PRNGKey


@runtime_checkable
class TaskModel(Protocol):
    """What :mod:`rnnjax.train` needs of a model: parameters, outputs, and a loss with metrics per task kind."""

    def init(self, key: PRNGKey) -> Params:
        """Creates the parameters."""
        ...

    def apply(self, params: Params, inputs, *, lengths=None, dropout_key: PRNGKey | None = None) -> Array:
        """The outputs on ``inputs`` ``(B, T, I)`` or ``(B, T)``: ``(B, O)`` or ``(B, T, O)``."""
        ...

    def loss_and_metrics(
        self, params: Params, batch: Batch, kind: str, *, dropout_key: PRNGKey | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """The scalar training loss and the metrics of ``kind`` on ``batch`` (dropout only with a key)."""
        ...


class ScoredModel:
    """Mixin giving a model :class:`TaskModel`'s ``loss_and_metrics`` from its ``apply``, and a parameter check."""

    def param_shapes(self) -> Params:
        """The parameter tree ``init`` makes, as ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0)))

    def check_params(self, params: Params) -> None:
        """Checks ``params`` against :meth:`param_shapes` (keys, list lengths, shapes; not dtypes) while tracing.

        Called by :meth:`loss_and_metrics` (and by families' ``apply`` where they call it), so parameters of
        another model or configuration are named at their path before any layer runs.

        Raises:
            ValueError: naming the paths that are missing, unexpected or of the wrong shape, such as
                ``params['core']['w_hh'] must have shape (16, 64), got (32, 128)``.
            TypeError: a leaf is not an array.
        """
        _checks.check_params(params, self)

    def outputs_to_score(
        self, params: Params, batch: Batch, *, dropout_key: PRNGKey | None = None
    ) -> tuple[Array, Batch]:
        """The outputs that ``loss_and_metrics`` scores and the batch holding their targets.

        By default ``apply`` on ``batch.inputs`` and ``batch.lengths``, scored against ``batch`` itself.

        Returns:
            ``(outputs, scored_batch)`` with ``outputs`` ``(B, O)`` or ``(B, T, O)``.
        """
        outputs = self.apply(params, batch.inputs, lengths=batch.lengths, dropout_key=dropout_key)
        return outputs, batch

    def loss_and_metrics(
        self, params: Params, batch: Batch, kind: str, *, dropout_key: PRNGKey | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """The training loss and the metrics of ``kind`` (:func:`rnnjax.metrics.compute_metrics`) on ``batch``."""
        self.check_params(params)
        outputs, scored_batch = self.outputs_to_score(params, batch, dropout_key=dropout_key)
        metrics = compute_metrics(kind, outputs, scored_batch)
        return metrics["loss"], metrics
