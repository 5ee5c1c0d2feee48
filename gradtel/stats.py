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

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from gradtel.layout import (
    COUNTER_ROWS,
    G_GLOBAL_NORM,
    G_STEPS,
    N_GLOBALS,
    N_ROWS,
    STATE_MISSING,
    STATE_NONFINITE,
    STATE_OK,
    STATE_ZERO,
    Snapshot,
)

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


def _compute_dtype(t: tf.Tensor) -> tf.Tensor:
    """float16/bfloat16 gradients are measured in float32 (their squares overflow in half precision)."""
    return t if t.dtype in (tf.float32, tf.float64) else tf.cast(t, tf.float32)


def _small_size(t: tf.Tensor) -> int | None:
    size = t.shape.num_elements()
    if size is None or size == 0 or size > SMALL_GRADIENT_ELEMENTS or t.dtype == tf.float64:
        return None
    return size


def _reduce(tensors: Sequence[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of squares and max |x| of each tensor, as two float64 vectors of len(tensors)."""
    sumsq: list[tf.Tensor | None] = [None] * len(tensors)
    maxabs: list[tf.Tensor | None] = [None] * len(tensors)
    small = [(i, _compute_dtype(t)) for i, t in enumerate(tensors) if _small_size(t)]
    if small:
        sizes = [t.shape.num_elements() for _, t in small]
        flat = tf.concat([tf.reshape(t, [-1]) for _, t in small], axis=0)
        segments = tf.repeat(tf.range(len(small)), sizes)
        seg_sumsq = tf.math.unsorted_segment_sum(tf.square(flat), segments, len(small))
        seg_maxabs = tf.math.unsorted_segment_max(tf.abs(flat), segments, len(small))
        seg_sumsq = tf.unstack(tf.cast(seg_sumsq, tf.float64)) if len(small) > 1 else [
            tf.cast(seg_sumsq[0], tf.float64)]
        seg_maxabs = tf.unstack(tf.cast(seg_maxabs, tf.float64)) if len(small) > 1 else [
            tf.cast(seg_maxabs[0], tf.float64)]
        for k, (i, _) in enumerate(small):
            sumsq[i], maxabs[i] = seg_sumsq[k], seg_maxabs[k]
    for i, t in enumerate(tensors):
        if sumsq[i] is None:
            t = _compute_dtype(t)
            sumsq[i] = tf.cast(2.0 * tf.nn.l2_loss(t), tf.float64)
            maxabs[i] = tf.cast(tf.reduce_max(tf.abs(t)), tf.float64)
    return tf.stack(sumsq), tf.stack(maxabs)


def _exact_sumsq(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Sums of squares in float64: used only when a float32 sum overflowed while every element is finite."""
    return tf.stack([tf.reduce_sum(tf.square(tf.cast(t, tf.float64))) for t in tensors])


class StatsTable:
    """Accumulated gradient statistics for one fixed list of variables, in one gradtel-owned variable.

    The variable is created eagerly (``tf.init_scope``) and never attached to the optimizer or the model, so
    checkpoints keep their layout. Its packed layout is ``[globals..., rows x variables]``.
    """

    def __init__(self, n_variables: int, name: str) -> None:
        self.n = n_variables
        with tf.init_scope():
            self.variable = tf.Variable(
                tf.zeros([N_GLOBALS + N_ROWS * n_variables], tf.float64),
                trainable=False, name=f"gradtel_{name}", dtype=tf.float64,
            )
        keep = np.zeros([N_ROWS, n_variables], bool)
        keep[list(COUNTER_ROWS)] = True
        self._accumulate = np.concatenate([[True, False], keep.reshape(-1)])

    def update(self, grads: Sequence[tf.Tensor | tf.IndexedSlices | None]) -> None:
        """Build (graph) or run (eager) the ops that fold one step's gradients into the table.

        ``grads`` is aligned with the table's variables; None marks a missing gradient (static per trace).
        """
        present = [i for i, g in enumerate(grads) if g is not None]
        missing = np.array([g is None for g in grads], np.float64)
        if present:
            measured = [_as_measurable(grads[i]) for i in present]
            tensors = [m for m, _ in measured]
            sumsq_p, maxabs_p = _reduce(tensors)
            overflow = tf.logical_and(tf.math.is_inf(sumsq_p), tf.math.is_finite(maxabs_p))
            sumsq_p = tf.cond(tf.reduce_any(overflow), lambda: _exact_sumsq(tensors), lambda: sumsq_p)
            # Empty gradients reduce to -inf (max of nothing): measure them as zeros.
            maxabs_p = tf.where(maxabs_p < 0.0, tf.zeros_like(maxabs_p), maxabs_p)
            touched_p = tf.stack([
                tf.cast(t if t is not None else tf.size(m, out_type=tf.int32), tf.float64)
                for m, t in measured
            ])
            # Scatter the present values into full-length vectors with one static gather.
            index = np.full(self.n, len(present), np.int32)
            index[present] = np.arange(len(present), dtype=np.int32)

            def full(values: tf.Tensor, fill: float) -> tf.Tensor:
                return tf.gather(tf.concat([values, tf.constant([fill], tf.float64)], 0), index)

            sumsq = full(sumsq_p, np.nan)
            maxabs = full(maxabs_p, np.nan)
            touched = full(touched_p, 0.0)
            global_norm = tf.sqrt(tf.reduce_sum(sumsq_p))
        else:
            sumsq = maxabs = tf.fill([self.n], tf.constant(np.nan, tf.float64))
            touched = tf.zeros([self.n], tf.float64)
            global_norm = tf.constant(np.nan, tf.float64)

        is_missing = tf.constant(missing > 0)
        nonfinite = tf.logical_and(
            tf.logical_not(is_missing),
            tf.logical_or(tf.math.is_nan(sumsq), tf.logical_not(tf.math.is_finite(maxabs))),
        )
        zero = tf.logical_and(tf.logical_not(tf.logical_or(is_missing, nonfinite)), tf.equal(maxabs, 0.0))
        state = tf.where(is_missing, STATE_MISSING,
                         tf.where(nonfinite, STATE_NONFINITE, tf.where(zero, STATE_ZERO, STATE_OK)))
        as_f64 = lambda b: tf.cast(b, tf.float64)  # noqa: E731
        rows = tf.stack([
            tf.constant(missing), as_f64(zero), as_f64(nonfinite), tf.ones([self.n], tf.float64),
            tf.sqrt(sumsq), maxabs, tf.cast(state, tf.float64), touched,
        ])
        delta = tf.concat([tf.stack([tf.constant(1.0, tf.float64), global_norm]), tf.reshape(rows, [-1])], 0)
        old = self.variable.read_value()
        self.variable.assign(tf.where(self._accumulate, old + delta, delta), read_value=False)

    def snapshot(self) -> Snapshot:
        """One read of the packed variable (safe from any thread while the step runs)."""
        flat = self.variable.numpy()
        return Snapshot(
            steps=int(flat[G_STEPS]),
            global_norm=float(flat[G_GLOBAL_NORM]),
            rows=flat[N_GLOBALS:].reshape(N_ROWS, self.n),
        )
