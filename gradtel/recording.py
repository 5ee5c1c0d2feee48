"""Recording steps: one step's gradients folded into its table, unscaled and compared across replicas first.

Runs inside the optimizer's funnel. In graph mode (``tf.function``, ``model.fit``, XLA) it runs once per trace and
builds the statistics ops into the step; in eager mode it runs each step and calls a ``tf.function`` of the same
ops, so there is no per-variable Python work per step either way.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from gradtel.tables import Tables, VariableTable


class StepRecorder:
    """Measures one optimizer's gradients: in the funnel with one replica, after the all-reduce with several.

    ``loss_scale`` returns a loss-scale optimizer's current scale variable (or None): its gradients arrive scaled
    and are divided back before they are measured.
    """

    def __init__(self, tables: Tables, loss_scale: Callable[[], Any] | None) -> None:
        self._tables = tables
        self._loss_scale = loss_scale
        self._lock = threading.Lock()
        #: id of the tf.Variable inside a Keras 3 variable -> the Keras variable (the reducer sees the former).
        self._outer: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        #: per replica thread: the full variable list of the step being traced, for record_reduced.
        self._local = threading.local()
        #: table key -> replica id -> indices of None gradients on that replica (static per trace).
        self._replica_missing: dict[tuple[int, ...], dict[int, frozenset[int]]] = {}

    def record(self, table: VariableTable, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """One replica's local gradients of a step: measured now with one replica; with several, their None
        pattern is compared across replicas and they are measured after the all-reduce (:meth:`record_reduced`),
        because the optimizer applies the sum."""
        replica = _replica()
        if replica is None:
            _measure(table, self._unscaled(grads), loss_scaled=self._loss_scale is not None)
            return
        self._compare_replicas(table, replica, grads)
        self._local.variables = list(variables)  # the reducer sees only the present ones
        for v in variables:
            inner = getattr(v, "value", None)
            if inner is not None and inner is not v:
                self._outer[id(inner)] = v

    def record_reduced(self, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """The all-reduced gradients of one replica (multi-replica strategies only; unscaled, as applied)."""
        if _replica() is None or not grads:
            return
        reduced = {id(self._outer.get(id(v), v)): g for g, v in zip(grads, variables, strict=True)}
        full = getattr(self._local, "variables", None) or [self._outer.get(id(v), v) for v in variables]
        _measure(self._tables.table_for(full), [reduced.get(id(v)) for v in full])

    def _compare_replicas(self, table: VariableTable, replica: int, grads: Sequence[Any]) -> None:
        """A variable with a gradient on some replicas and None on others is flagged (static, at trace time)."""
        missing = frozenset(i for i, g in enumerate(grads) if g is None)
        with self._lock:
            seen = self._replica_missing.setdefault(table.variable_ids, {})
            seen[replica] = missing
            patterns = set(seen.values())
            if len(patterns) > 1:
                table.disagreement = set().union(*patterns) - frozenset.intersection(*patterns)

    def _unscaled(self, grads: Sequence[Any]) -> list[Any]:
        """The gradients divided by the loss scale (as the loss-scale optimizer will apply them)."""
        scale_variable = self._loss_scale() if self._loss_scale is not None else None
        if scale_variable is None:
            return list(grads)
        import tensorflow as tf

        scale = tf.cast(tf.convert_to_tensor(scale_variable), tf.float32)

        def unscale(g: Any) -> Any:
            if g is None:
                return None
            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(g.values / tf.cast(scale, g.values.dtype), g.indices, g.dense_shape)
            return g / tf.cast(scale, g.dtype)

        return [unscale(g) for g in grads]


def _measure(table: VariableTable, grads: Sequence[Any], loss_scaled: bool = False) -> None:
    import tensorflow as tf

    if tf.inside_function():
        table.stats.update(grads, loss_scaled)
        return
    # Eager: the update reads then writes the table; steps from several threads must not interleave.
    with table.lock:
        if table.compiled is None:
            table.compiled = tf.function(table.stats.update, autograph=False)
        table.compiled(list(grads), loss_scaled)


def _replica() -> int | None:
    """This replica's id under a strategy with several replicas in sync, else None (measure in the funnel)."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    return int(replica) if replica is not None else 0
