"""In-graph gradient statistics and the packed accumulator they land in.

Each optimizer step, for the gradients handed to the optimizer, gradtel computes per variable: missing (static,
known at trace time), all-zero, non-finite, L2 norm and max |g|, plus the global norm. Only numeric TensorFlow
ops are used (XLA-safe, no host round trip). The results are folded into ONE gradtel-owned float64 variable,
so a single read from the exporter's thread is a consistent snapshot of a whole step.

Cost: small gradients are flattened into one vector and reduced with two segment reductions (a handful of
kernels however many variables there are); large or dynamically shaped gradients get two reductions each.
That is about one extra read of the gradients, against the several reads and writes of Adam's update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from gradtel.layout import (
    COUNTER_ROWS,
    G_GLOBAL_NORM,
    G_SKIPPED,
    G_STEPS,
    GLOBAL_COUNTERS,
    MAX_ABS,
    MISSING,
    N_GLOBALS,
    N_ROWS,
    NONFINITE,
    NORM,
    ROWS_TOUCHED,
    STATE,
    STATE_MISSING,
    STATE_NONFINITE,
    STATE_OK,
    STATE_ZERO,
    STEPS_SEEN,
    ZERO,
    Snapshot,
)

#: The rows of a variable whose gradient is missing at this step (per layout.py's row order).
_MISSING_COLUMN = np.zeros([N_ROWS, 1], np.float64)
_MISSING_COLUMN[[MISSING, STEPS_SEEN, STATE], 0] = (1.0, 1.0, STATE_MISSING)
_MISSING_COLUMN[[NORM, MAX_ABS], 0] = np.nan

#: Gradients with at most this many elements (and a static shape) are reduced together in one segment pass.
SMALL_GRADIENT_ELEMENTS = 1 << 16


def _as_measurable(grad: tf.Tensor | tf.IndexedSlices) -> tuple[tf.Tensor, tf.Tensor | None]:
    """A dense tensor whose elements are the gradient's elements, and the number of rows touched.

    IndexedSlices may repeat an index: the gradient of that row is the SUM of its slices, so the rows are merged
    before measuring (an exact norm) without densifying the whole table.
    """
    if isinstance(grad, tf.IndexedSlices):
        unique, position = tf.unique(grad.indices)
        n_unique = tf.shape(unique)[0]
        merged = tf.math.unsorted_segment_sum(grad.values, position, n_unique)
        return merged, n_unique
    return tf.convert_to_tensor(grad), None


def _as_float(t: tf.Tensor) -> tf.Tensor:
    """float16/bfloat16 gradients are measured in float32 (their squares overflow in half precision)."""
    return t if t.dtype in (tf.float32, tf.float64) else tf.cast(t, tf.float32)


def _is_small(t: tf.Tensor) -> bool:
    size = t.shape.num_elements()
    return size is not None and 0 < size <= SMALL_GRADIENT_ELEMENTS and t.dtype != tf.float64


def _reduce(tensors: Sequence[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, list[int]]:
    """Sum of squares and max |x| of each tensor, as two float64 vectors in the returned order of ``tensors``.

    On CPU a step of small tensors pays per op, not per byte: small gradients of one (shape, dtype) are stacked
    and reduced over their trailing axes together, so the graph grows with the number of distinct shapes, not of
    variables. Large ones are reduced one by one. The results come grouped (the caller's one gather puts them
    back in variable order). float32 squares overflow above ~1.8e19 and underflow below ~1e-19: a step where a
    finite, non-zero gradient got an inf or 0 sum is recomputed in float64 (a cond that almost never takes its
    expensive branch).
    """
    groups: dict[tuple[tuple[int, ...], tf.DType], list[int]] = {}
    large: list[int] = []
    for i, t in enumerate(tensors):
        if _is_small(t):
            groups.setdefault((tuple(t.shape.as_list()), t.dtype), []).append(i)
        else:
            large.append(i)
    sumsq_parts: list[tf.Tensor] = []
    maxabs_parts: list[tf.Tensor] = []
    exact_parts: list[Callable[[], tf.Tensor]] = []
    order: list[int] = []
    for (shape, _), members in groups.items():
        parts = [_as_float(tensors[i]) for i in members]
        stacked = tf.stack(parts) if len(parts) > 1 else tf.expand_dims(parts[0], 0)
        axes = list(range(1, 1 + len(shape)))
        sumsq_parts.append(tf.reduce_sum(tf.square(stacked), axis=axes))
        maxabs_parts.append(tf.reduce_max(tf.abs(stacked), axis=axes))
        exact_parts.append(lambda s=stacked, a=axes: tf.reduce_sum(tf.square(tf.cast(s, tf.float64)), axis=a))
        order += members
    for i in large:
        t = _as_float(tensors[i])
        sumsq_parts.append(tf.reshape(2.0 * tf.nn.l2_loss(t), [1]))
        maxabs_parts.append(tf.reshape(tf.reduce_max(tf.abs(t)), [1]))
        exact_parts.append(lambda t=t: tf.reshape(tf.reduce_sum(tf.square(tf.cast(t, tf.float64))), [1]))
        order.append(i)

    def assemble(parts: Sequence[tf.Tensor]) -> tf.Tensor:
        if len({p.dtype for p in parts}) == 1:  # one cast after the concat instead of one per part
            return tf.cast(tf.concat(parts, axis=0) if len(parts) > 1 else parts[0], tf.float64)
        return tf.concat([tf.cast(p, tf.float64) for p in parts], axis=0)

    sumsq, maxabs = assemble(sumsq_parts), assemble(maxabs_parts)
    overflow = tf.logical_and(tf.math.is_inf(sumsq), tf.math.is_finite(maxabs))
    underflow = tf.logical_and(tf.equal(sumsq, 0.0), maxabs > 0.0)
    inexact = tf.reduce_any(tf.logical_or(overflow, underflow))
    sumsq = tf.cond(inexact, lambda: assemble([f() for f in exact_parts]), lambda: sumsq)
    return sumsq, maxabs, order


def _rows_touched(measured: Sequence[tuple[tf.Tensor, tf.Tensor | None]]) -> tf.Tensor:
    """Elements (dense) or distinct rows (IndexedSlices) per gradient; static wherever the shape is known."""
    static = np.array([m.shape.num_elements() or 0 for m, _ in measured], np.float64)
    dynamic = [(i, rows if rows is not None else tf.size(m)) for i, (m, rows) in enumerate(measured)
               if rows is not None or m.shape.num_elements() is None]
    if not dynamic:
        return tf.constant(static)
    indices = tf.constant([[i] for i, _ in dynamic])
    return tf.tensor_scatter_nd_update(static, indices, tf.cast(tf.stack([d for _, d in dynamic]), tf.float64))


class StatsTable:
    """Accumulated gradient statistics for one fixed list of variables, in one gradtel-owned variable.

    The variable is created eagerly (``tf.init_scope``) and never attached to the optimizer or the model, so
    checkpoints keep their layout. Its packed layout is ``[globals..., rows x variables]``.
    """

    def __init__(self, n_variables: int, name: str) -> None:
        self.n = n_variables
        # ON_READ: under a strategy every replica updates its own copy (no cross-replica traffic in the step);
        # the exporter reads the first local replica's.
        with tf.init_scope():
            self.variable = tf.Variable(
                tf.zeros([N_GLOBALS + N_ROWS * n_variables], tf.float64),
                trainable=False, name=f"gradtel_{name}", dtype=tf.float64,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        keep = np.zeros([N_ROWS, n_variables], bool)
        keep[list(COUNTER_ROWS)] = True
        self._accumulate = np.concatenate([GLOBAL_COUNTERS, keep.reshape(-1)])

    def update(self, grads: Sequence[tf.Tensor | tf.IndexedSlices | None], loss_scaled: bool = False) -> None:
        """Build (graph) or run (eager) the ops that fold one step's gradients into the table.

        ``grads`` is aligned with the table's variables; None marks a missing gradient (static per trace).
        ``loss_scaled``: a dynamic loss-scale optimizer skips a step whose gradients overflow and lowers its
        scale; that routine event is counted as a skipped step, not as per-variable non-finite steps (the state
        row still says which variables were non-finite).
        """
        present = [i for i, g in enumerate(grads) if g is not None]
        if present:
            measured = [_as_measurable(grads[i]) for i in present]
            sumsq, maxabs, order = _reduce([m for m, _ in measured])
            # Empty gradients reduce to -inf (max of nothing): measure them as zeros.
            maxabs = tf.where(maxabs < 0.0, tf.zeros_like(maxabs), maxabs)
            nonfinite = tf.logical_or(tf.math.is_nan(sumsq), tf.logical_not(tf.math.is_finite(maxabs)))
            zero = tf.logical_and(tf.equal(maxabs, 0.0), tf.logical_not(nonfinite))
            nonfinite_f, zero_f = tf.cast(nonfinite, tf.float64), tf.cast(zero, tf.float64)
            skipped = tf.reduce_any(nonfinite) if loss_scaled else tf.constant(False)
            counted_nonfinite = nonfinite_f * (1.0 - tf.cast(skipped, tf.float64)) if loss_scaled else nonfinite_f
            # Over the finite gradients: a NaN would hide the norm of every other variable (and OpenTelemetry
            # drops non-finite observations); non-finite gradients are counted on their own.
            global_norm = tf.sqrt(tf.reduce_sum(tf.where(tf.math.is_finite(sumsq), sumsq, tf.zeros_like(sumsq))))
            # The rows of the present gradients, in _reduce's order, then one column for every missing one; one
            # static gather lays them out per variable (the graph's op count does not grow with variables).
            p = len(present)
            by_row = {
                MISSING: tf.zeros([p], tf.float64), ZERO: zero_f, NONFINITE: counted_nonfinite,
                STEPS_SEEN: tf.ones([p], tf.float64), NORM: tf.sqrt(sumsq), MAX_ABS: maxabs,
                STATE: STATE_NONFINITE * nonfinite_f + STATE_ZERO * zero_f + STATE_OK,
                ROWS_TOUCHED: _rows_touched([measured[i] for i in order]),
            }
            present_rows = tf.stack([by_row[row] for row in range(N_ROWS)])
            index = np.full(self.n, p, np.int32)
            index[[present[i] for i in order]] = np.arange(p, dtype=np.int32)
            rows = tf.gather(tf.concat([present_rows, tf.constant(_MISSING_COLUMN)], 1), index, axis=1)
        else:
            rows = tf.constant(np.repeat(_MISSING_COLUMN, self.n, axis=1))
            global_norm = tf.constant(np.nan, tf.float64)
            skipped = tf.constant(False)
        globals_ = tf.stack([tf.constant(1.0, tf.float64), global_norm, tf.cast(skipped, tf.float64)])
        delta = tf.concat([globals_, tf.reshape(rows, [-1])], 0)
        old = self.variable.read_value()
        self.variable.assign(tf.where(self._accumulate, old + delta, delta), read_value=False)

    def snapshot(self) -> Snapshot:
        """One read of the packed variable (safe from any thread while the step runs)."""
        local = getattr(self.variable, "values", None)  # a distributed variable: its local replicas' copies
        flat = (local[0] if local else self.variable).numpy()
        return Snapshot(
            steps=int(flat[G_STEPS]),
            global_norm=float(flat[G_GLOBAL_NORM]),
            skipped=int(flat[G_SKIPPED]),
            rows=flat[N_GLOBALS:].reshape(N_ROWS, self.n),
        )
