"""In-graph gradient statistics and the packed accumulator they land in.

Each optimizer step, for the gradients handed to the optimizer, gradtel computes per variable: missing (static,
known at trace time), zero, non-finite and the L2 norm, plus the global norm; max |g| on request. Only numeric
TensorFlow ops are used (XLA-safe, no host round trip). The results are folded into ONE gradtel-owned float64
variable, so a single read from the exporter's thread is a consistent snapshot of a whole step.

Cost: on a CPU a step of small tensors pays per op, not per byte, and a first step (trace + Grappler) pays per op
too. By default small shape-alike gradients (up to 256 elements) are stacked and reduced together (three ops per
distinct shape), every other gradient gets one ``L2Loss`` (TensorFlow's cheapest whole-tensor reduction), and
everything after that works on one vector of all the variables: a fixed ~25 ops however many variables there are.
Its constants of one value per variable are integers (layer ids, element counts, 4 bytes each), plus a boolean mask
only where some gradients are missing: the first call's graph optimisation pays for the graph's bytes as well
(docs/benchmarks.md, "The first call's graph"). And it pays per kind of op: with oneDNN on (TensorFlow's default on
x86 CPUs) a function's first call scans TensorFlow's whole kernel registry, twice, for every (op type, dtype) pair of
its graph that the calling thread has not looked up yet (``MklLayoutRewritePass``; about 1.5 ms a pair, once per
process). So the update keeps to 18 pairs (it used 37: 48 ms of a 100-variable model's first call, now 28 ms): add,
subtract, multiply, max, select, equal, sum, square root, floor division and modulo and two segment reductions in
float64, slicing, reshaping, stacking and concatenating, and the float32 sums of squares; no ``IsFinite``, ``Neg``,
logarithm or bit operation. tests/core/test_statistics.py holds the list (docs/benchmarks.md, "A first call's fixed
cost").
Zero and non-finite are then read off the float32 sum of squares: "zero" is a gradient whose every element squares
to 0 in float32 (|g| below ~1e-19, too small for any optimizer to move the variable), "non-finite" one holding
NaN/Inf or whose sum of squares overflows float32 (a norm above ~1.8e19: an exploding gradient, on which Adam's own
float32 squares overflow too). Float64 gradients are measured in float64.

``max_abs`` (``instrument(max_abs=True)`` or ``GRADTEL_MAX_ABS=true``) adds max |g| per variable and makes those
edges exact (a finite gradient whose float32 squares over- or underflowed is recomputed in float64), at about
twice the cost on a model of many small layers; it stacks shape-alike gradients up to 65,536 elements.

The same update keeps, per variable, the step at which each bad state first appeared and the latest return to
health (vector ops on the table's own rows), and folds the step into the run's downsampled history (one scatter of
one row into another gradtel-owned variable, with no control flow; gradtel/history.py says how and why): about 70
more ops per step, most of them on scalars, whatever the number of variables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from gradtel import history
from gradtel.layout import (
    FIRST_BASE,
    STATE_MISSING,
    STATE_NONFINITE,
    STATE_OK,
    STATE_ZERO,
    Snapshot,
    Storage,
)

#: Gradients with at most this many elements (and a static shape) are stacked with their shape-alikes and reduced
#: together. On the default path the stack is a copy that L2Loss does not make: measured on 130 gradients (64 of
#: 32x32, 64 of 32), stacking only the 32-element ones made the update 4 % cheaper than one L2Loss each, stacking
#: the 1,024-element kernels too 18 % dearer. So biases, norms and other small vectors are stacked, kernels are not.
STACK_ELEMENTS = 1 << 8
#: The max_abs path stacks larger ones too (its reductions are two per stack instead of two per gradient).
STACK_ELEMENTS_MAX_ABS = 1 << 16
#: The STATE values that are bad, in the order of the MISSING, ZERO, NONFINITE rows (and of the first-bad ones).
_BAD_STATES = np.array([[STATE_MISSING], [STATE_ZERO], [STATE_NONFINITE]])


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


class _Groups:
    """The present gradients split into stacks of shape-alike small ones and the rest, reduced one by one.

    Why: on a model of many small variables a step pays per op, at trace time (each op is built in Python and
    optimised by Grappler) and at run time. One stack of N shape-alike gradients is three ops (Pack, Square, Sum)
    instead of N reductions, so the ops gradtel adds grow with the number of distinct shapes, not of variables.
    Every reduction's result lands in ``order``; :meth:`in_table_order` puts a vector back in table order.
    """

    def __init__(self, measured: Sequence[tf.Tensor | None], max_elements: int) -> None:
        self.n = len(measured)
        by_shape: dict[tuple[tuple[int, ...], tf.DType], list[int]] = {}
        for i, t in enumerate(measured):
            size = None if t is None else t.shape.num_elements()
            if t is not None and size is not None and 0 < size <= max_elements and t.dtype != tf.float64:
                by_shape.setdefault((tuple(t.shape.as_list()), t.dtype), []).append(i)
        self.stacks: list[tuple[list[int], tf.Tensor]] = []  # members, their gradients stacked (measured as float)
        stacked: set[int] = set()
        for (shape, _), members in by_shape.items():
            if len(members) < 2:
                continue
            size = max(1, int(np.prod(shape)))
            per_stack = max(2, max_elements * 64 // size)  # a transient copy of at most 64 x max_elements elements
            for first in range(0, len(members), per_stack):
                chunk = members[first : first + per_stack]
                self.stacks.append((chunk, _as_float(tf.stack([measured[i] for i in chunk]))))
                stacked.update(chunk)
        self.single = [i for i, t in enumerate(measured) if t is not None and i not in stacked]
        self.order = [i for chunk, _ in self.stacks for i in chunk] + self.single

    @staticmethod
    def axes(stack: tf.Tensor) -> list[int]:
        """The trailing axes of a stack: reducing over them leaves one value per member."""
        return list(range(1, stack.shape.rank))

    def in_table_order(self, values: tf.Tensor, filler: float) -> tf.Tensor:
        """``values`` (one per gradient in ``order``) as a float64 vector in table order, ``filler`` where missing."""
        if self.order == list(range(self.n)):  # nothing missing and nothing moved: no gather (and no index constant)
            return tf.cast(values, tf.float64)
        index = np.full(self.n, len(self.order), np.int32)  # missing ones point at the trailing filler
        index[self.order] = np.arange(len(self.order), dtype=np.int32)
        values = tf.concat([tf.cast(values, tf.float64), tf.constant([filler], tf.float64)], 0)
        return tf.gather(values, index)


def _assemble(parts: Sequence[tf.Tensor]) -> tf.Tensor:
    """Vectors of possibly different float dtypes as one vector (one cast after the concat when they agree)."""
    if len({p.dtype for p in parts}) == 1:
        return tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]
    return tf.concat([tf.cast(p, tf.float64) for p in parts], axis=0)


def _finite(values: tf.Tensor) -> tf.Tensor:
    """Where ``values`` (float64) are finite: ``x - x`` is 0 for a finite x and NaN for NaN or +-inf.

    Not ``tf.math.is_finite``: one more (op type, dtype) pair for the first call to look up (module docstring).
    """
    return tf.equal(values - values, 0.0)


def _sums_of_squares(measured: Sequence[tf.Tensor | None]) -> tf.Tensor:
    """Sum of squares of each gradient as one float64 vector in table order (0 where the gradient is missing).

    Stacks are squared and summed in their own (float32) precision, so "zero" and "non-finite" mean the same as
    for the gradients reduced one by one with ``L2Loss`` (sum(t**2) / 2, TensorFlow's cheapest whole-tensor
    reduction).
    """
    groups = _Groups(measured, STACK_ELEMENTS)
    parts = [tf.reduce_sum(tf.square(stack), axis=groups.axes(stack)) for _, stack in groups.stacks]
    if groups.single:
        halves = [tf.nn.l2_loss(_as_float(measured[i])) for i in groups.single]
        dtypes = {h.dtype for h in halves}
        dtype = dtypes.pop() if len(dtypes) == 1 else tf.float64  # one cast after the stack when they all agree
        parts.append(2.0 * tf.stack([h if h.dtype == dtype else tf.cast(h, dtype) for h in halves]))
    return groups.in_table_order(_assemble(parts), 0.0)


def _exact_reduce(measured: Sequence[tf.Tensor | None]) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of squares and max |g| of each gradient, as two float64 vectors in table order (0 and NaN where
    missing), exact at float32's edges: the ``max_abs`` path.

    float32 squares overflow above ~1.8e19 and underflow below ~1e-19: a step where a finite, non-zero gradient got
    an inf or 0 sum is recomputed in float64 (a cond that almost never takes its expensive branch, and captures one
    stacked tensor per shape, not every gradient).
    """
    groups = _Groups(measured, STACK_ELEMENTS_MAX_ABS)
    sumsq_parts: list[tf.Tensor] = []
    maxabs_parts: list[tf.Tensor] = []
    exact_parts: list[Callable[..., tf.Tensor]] = []  # called without arguments: the lambdas bind their tensors
    for _, stack in groups.stacks:
        axes = groups.axes(stack)
        sumsq_parts.append(tf.reduce_sum(tf.square(stack), axis=axes))
        maxabs_parts.append(tf.reduce_max(tf.abs(stack), axis=axes))
        exact_parts.append(lambda s=stack, a=axes: tf.reduce_sum(tf.square(tf.cast(s, tf.float64)), axis=a))
    for i in groups.single:
        t = _as_float(measured[i])
        sumsq_parts.append(tf.reshape(2.0 * tf.nn.l2_loss(t), [1]))
        maxabs_parts.append(tf.reshape(tf.reduce_max(tf.abs(t)), [1]))
        exact_parts.append(lambda t=t: tf.reshape(tf.reduce_sum(tf.square(tf.cast(t, tf.float64))), [1]))

    sumsq = tf.cast(_assemble(sumsq_parts), tf.float64)
    maxabs = tf.maximum(tf.cast(_assemble(maxabs_parts), tf.float64), 0.0)  # an empty gradient's max is -inf: 0
    overflow = tf.logical_and(tf.math.is_inf(sumsq), tf.math.is_finite(maxabs))
    underflow = tf.logical_and(tf.equal(sumsq, 0.0), maxabs > 0.0)
    inexact = tf.reduce_any(tf.logical_or(overflow, underflow))
    sumsq = tf.cond(inexact, lambda: tf.cast(_assemble([f() for f in exact_parts]), tf.float64), lambda: sumsq)
    return groups.in_table_order(sumsq, 0.0), groups.in_table_order(maxabs, np.nan)


def _rows_touched(measured: Sequence[tuple[tf.Tensor, tf.Tensor | None] | None]) -> tf.Tensor:
    """Elements (dense) or distinct rows (IndexedSlices) per gradient; static wherever the shape is known.

    The static counts are an integer constant cast in the step: half the bytes of a float64 one (see
    gradtel/layout.py for why a constant's bytes matter).
    """
    static = np.array([0 if m is None else m[0].shape.num_elements() or 0 for m in measured], np.int64)
    static = static.astype(np.int32) if static.max(initial=0) < 2**31 else static
    dynamic = [
        (i, m[1] if m[1] is not None else tf.size(m[0]))
        for i, m in enumerate(measured)
        if m is not None and (m[1] is not None or m[0].shape.num_elements() is None)
    ]
    if not dynamic:
        return tf.cast(static, tf.float64)
    indices = tf.constant([[i] for i, _ in dynamic])
    counts = tf.cast(tf.stack([d for _, d in dynamic]), static.dtype)
    return tf.cast(tf.tensor_scatter_nd_update(static, indices, counts), tf.float64)


def _new_variable(initial_value: tf.Tensor, **kwargs: Any) -> tf.Variable:
    """The table's variable, created so that the ``tf.function`` being traced does not notice it.

    A variable created during a function's first trace (through ``tf.Variable``, even under ``init_scope``) goes
    through the function's variable creator, which then traces the whole step a second time: a step that creates no
    variable of its own (an optimizer built before it, as ``fit`` does) would pay that second trace for gradtel
    alone, as long as its first trace. Outside a distribution strategy the plain ``ResourceVariable`` class skips
    the creator stack; under a strategy the creator is what makes the per-replica variable, so it is kept.
    """
    if tf.distribute.has_strategy():
        return tf.Variable(initial_value, **kwargs)
    return resource_variable_ops.ResourceVariable(initial_value, **kwargs)


def _read_rows(variable: tf.Variable, rows: Any) -> tf.Tensor:
    """Rows of a gradtel variable, read in the step by ``ResourceGather``, never by ``ReadVariableOp``.

    Why: one ``ReadVariableOp`` in the step, even of a scalar, made TensorFlow's graph optimisation of the whole step
    15-24 % slower at 2,000 variables and its first call 4-5 % slower at 1,000; the same read as a gather cost 0-2 %
    (docs/benchmarks.md, "The first call's graph"). On the handle, under a strategy, this replica's own copy.
    """
    return tf.raw_ops.ResourceGather(resource=variable.handle, indices=rows, dtype=tf.float64)


def _host_value(variable: tf.Variable) -> np.ndarray:
    """A gradtel variable's value on the host, in one read; of a distributed one (ON_READ), the first local
    replica's copy, the one the step of this process updates."""
    local = getattr(variable, "values", None)
    return np.asarray((local[0] if local else variable).numpy())


class _History:
    """One downsampled history buffer in a gradtel-owned variable (layout and reasons in gradtel/history.py).

    The step folds itself in without a ``cond``: merging the points of a full buffer is spread over the following
    steps, one pair at the first step of each new point, into slots that a bit rotation assigns (see ``record``).
    Why: a ``tf.cond`` in the step puts control flow (an ``If``, lowered to Switch/Merge) into the user's graph,
    and TensorFlow's graph optimisation of the whole step then took 13 % longer at 1,000 variables and 21 % at
    2,000 (measured side by side; without the ``cond``: 1 % and 3 %), a start-up cost growing with the model.
    """

    def __init__(self, points: int, columns: int, name: str) -> None:
        self.points = points
        with tf.init_scope():
            self.variable = _new_variable(
                np.full([points, columns], -np.inf),  # NumPy: an eager Fill's first run costs 5-10 ms
                trainable=False,
                name=name,
                dtype=tf.float64,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def record(self, before: tf.Tensor, width: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        """Fold the values (one per column) of the step after the first ``before`` steps into its point; returns
        the steps per point from now on (``width`` until the buffer fills, then doubled).

        Point ``b`` (0-based, steps ``[b*w + 1, (b+1)*w]``) lives in the slot ``b`` rotated left by ``log2(w)``
        bits. When the buffer is full the width doubles and the next step falls on point ``P/2``; from then on
        the first step of each new point ``P/2 + j`` first merges the old pair ``2j, 2j + 1`` (timeline-adjacent
        at the old width) into the slot of new point ``j`` and empties the other one of the pair, which is new
        point ``P/2 + j``'s own slot. By the last new point every pair is merged, so the next doubling finds the
        same layout one rotation on. Every point names its own steps, so a read between merges is exact too.
        Per step: two rows read, two written and one scattered, a few scalar ops, and no control flow.

        The slots are float64 arithmetic, not bit operations or a logarithm: each (op type, dtype) pair is a cost
        the first call pays (module docstring), so the history uses the update's own few.
        ``w mod (P - 1)`` is ``2 ** (log2(w) mod log2(P))`` (``2 ** log2(P)`` is 1 modulo ``P - 1``), and a point
        ``p < P`` rotated left by those bits is ``p * 2**t mod P + p * 2**t // P``: every value an exact integer.
        """
        half = self.points // 2
        width = tf.where(tf.equal(before, self.points * width), 2.0 * width, width)  # a full buffer: doubled
        rotation = tf.math.floormod(width, self.points - 1.0)
        point = tf.math.floordiv(before, width)  # < points
        merging = tf.logical_and(tf.equal(before, point * width), tf.logical_not(tf.equal(width, 1.0)))
        # [the merged pair's point, this point]; outside a merge the first is any point, written back as read
        shifted = tf.maximum(point - np.array([half, 0.0]), 0.0) * rotation
        slots = tf.math.floormod(shifted, self.points) + tf.math.floordiv(shifted, self.points)
        indices = tf.cast(slots, tf.int32)
        handle = self.variable.handle  # the raw ops on the handle: under a strategy, this replica's own copy
        pair = _read_rows(self.variable, indices)
        first, second = pair[0], pair[1]
        merged = tf.concat(
            [
                tf.where(merging, tf.maximum(first, second), first),
                tf.where(merging, np.float64(-np.inf), second),
            ],
            0,
        )
        tf.raw_ops.ResourceScatterUpdate(resource=handle, indices=indices, updates=tf.reshape(merged, [2, -1]))
        this = tf.cast(slots[1:], tf.int32)  # sliced as float64: an int32 slice would be one more (op, dtype)
        tf.raw_ops.ResourceScatterMax(resource=handle, indices=this, updates=tf.reshape(values, [1, -1]))
        return width

    def read(self) -> np.ndarray:
        return _host_value(self.variable)


class StatsTable:
    """Accumulated gradient statistics for one fixed list of variables, in one gradtel-owned variable.

    The variable is created eagerly (``tf.init_scope``) and never attached to the optimizer or the model, so
    checkpoints keep their layout. Its packed layout is three blocks (gradtel/layout.py). Two more variables hold
    the run's downsampled history (gradtel/history.py); ``layers`` (each variable's layer) groups its per-layer
    series and ``expected`` (declared expected to be missing) keeps those out of the unhealthy counts.
    """

    def __init__(
        self,
        n_variables: int,
        name: str,
        max_abs: bool = False,
        layers: Sequence[str] | None = None,
        expected: Sequence[bool] | None = None,
    ) -> None:
        self.n = n_variables
        self.max_abs = max_abs
        self.storage = Storage(n_variables)
        # ON_READ: under a strategy every replica updates its own copy (no cross-replica traffic in the step);
        # the exporter reads the first local replica's.
        with tf.init_scope():
            self.variable = _new_variable(
                self.storage.initial()[np.newaxis],  # one row: the step reads it by ResourceGather (_read_rows)
                trainable=False,
                name=f"gradtel_{name}",
                dtype=tf.float64,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        index: dict[str, int] = {}
        self._layer_ids = np.array(
            [index.setdefault(layer, len(index)) for layer in layers or [""] * n_variables], np.int32
        )
        #: The layers in the order of the per-layer history's series.
        self.layers = list(index)
        self._expected = np.array(expected if expected is not None else [False] * n_variables, bool)
        # One buffer for both histories while the layers' points are as many as the global ones (up to ~170
        # layers): one set of history ops per step instead of two.
        layer_points = history.layer_points(len(index))
        self.shared_history = layer_points == history.GLOBAL_POINTS
        global_columns = history.GLOBAL_COLUMNS + (history.layer_columns(len(index)) - 2 if self.shared_history else 0)
        self.history = _History(history.GLOBAL_POINTS, global_columns, f"gradtel_{name}_history")
        self.layer_history = (
            None
            if self.shared_history
            else _History(layer_points, history.layer_columns(len(index)), f"gradtel_{name}_layer_history")
        )

    def update(self, grads: Sequence[tf.Tensor | tf.IndexedSlices | None], loss_scaled: bool = False) -> None:
        """Build (graph) or run (eager) the ops that fold one step's gradients into the table.

        ``grads`` is aligned with the table's variables; None marks a missing gradient (static per trace). Every
        per-variable row is one vector op; a boolean constant of one value per variable is added only where a trace
        needs it (some gradients missing, some variables declared expected to be missing), because the first call
        pays for the graph's bytes (gradtel/layout.py). The state (ok, missing, zero, non-finite) is computed once
        and the count, first-bad and recovery rows are read off it.
        ``loss_scaled``: a dynamic loss-scale optimizer skips a step whose gradients overflow and lowers its
        scale; that routine event is counted as a skipped step, not as per-variable non-finite steps (the state
        row still says which variables were non-finite, and no first non-finite step is set).
        """
        present = np.array([g is not None for g in grads])
        measured = [None if g is None else _as_measurable(g) for g in grads]
        dense = [None if m is None else m[0] for m in measured]
        max_abs: tf.Tensor | None = None  # not measured
        if not present.any():
            sumsq = tf.zeros([self.n], tf.float64)
        elif self.max_abs:
            sumsq, max_abs = _exact_reduce(dense)
        else:
            sumsq = _sums_of_squares(dense)
        missing = None if present.all() else tf.constant(~present)
        at = self.storage
        old = tf.reshape(_read_rows(self.variable, [0]), [-1])  # the table is one row (see _read_rows)
        before = old[0]  # steps before this one
        step = before + 1.0  # this step, 1-based
        width, layer_width = tf.unstack(old[at.widths])
        # A missing gradient's 0 is finite: never non-finite. On the max_abs path a finite gradient whose float32
        # squares overflowed was recomputed in float64, so only NaN/Inf elements leave its sum non-finite.
        finite = _finite(sumsq)
        ok_or_zero = tf.where(tf.equal(sumsq, 0.0), np.float64(STATE_ZERO), np.float64(STATE_OK))
        state = tf.where(finite, ok_or_zero, np.float64(STATE_NONFINITE))
        if missing is not None:
            state = tf.where(missing, np.float64(STATE_MISSING), state)
        bad = tf.cast(tf.equal(state, _BAD_STATES), tf.float64)  # [3, n]: 1.0 where missing / zero / non-finite
        if loss_scaled:
            skipped = tf.reduce_max(bad[2])
            counted = bad * tf.reshape(tf.stack([np.float64(1.0), np.float64(1.0), 1.0 - skipped]), [3, 1])
        else:
            skipped, counted = tf.constant(0.0, tf.float64), bad
        # Over the finite gradients: a NaN would hide the norm of every other variable (and OpenTelemetry drops
        # non-finite observations); non-finite gradients are counted on their own.
        finite_sumsq = tf.where(finite, sumsq, 0.0)  # missing ones are 0 already
        global_norm = tf.sqrt(tf.reduce_sum(finite_sumsq)) if present.any() else tf.constant(np.nan, tf.float64)
        norm = tf.sqrt(sumsq)
        if missing is not None:
            norm = tf.where(missing, np.float64(np.nan), norm)
        widths = self._record_history(before, step, width, layer_width, global_norm, finite_sumsq, state, bad, present)
        accumulated = old[: at.latest] + tf.concat([tf.stack([np.float64(1.0), skipped]), tf.reshape(counted, [-1])], 0)
        latest = [
            tf.stack([global_norm, *widths]),
            norm,
            norm * np.nan if max_abs is None else max_abs,  # NaN: not measured (no constant of NaNs in the graph)
            _rows_touched(measured),
            state,
        ]
        folded = self._first_and_recovered(old, step, state, counted)
        self.variable.assign(tf.reshape(tf.concat([accumulated, *latest, folded], 0), [1, -1]), read_value=False)

    def _first_and_recovered(self, old: tf.Tensor, step: tf.Tensor, state: tf.Tensor, bad: tf.Tensor) -> tf.Tensor:
        """The six rows FIRST_MISSING..RECOVERED_NONFINITE, flattened, each the max of its old value and this step's.

        A first bad step is stored as ``FIRST_BASE - step``, so the max keeps the earliest one; a recovery (a step
        whose state is ok right after a step in that state: the STATE row still holds the previous step's) as the
        step, so the max keeps the latest. Every variable of a table is seen at each of its steps. ``bad`` is
        counted: a loss-scale optimizer's routine overflow sets no first non-finite step, and the reader ignores a
        recovery from a state whose first step was never set.
        """
        at = self.storage
        was = tf.cast(tf.equal(old[at.state : at.folded], _BAD_STATES), tf.float64)
        recovered = was * tf.where(tf.equal(state, STATE_OK), step, 0.0)
        now = tf.reshape(tf.concat([bad * (FIRST_BASE - step), recovered], 0), [-1])
        return tf.maximum(old[at.folded :], now)

    def _record_history(
        self,
        before: tf.Tensor,
        step: tf.Tensor,
        width: tf.Tensor,
        layer_width: tf.Tensor,
        global_norm: tf.Tensor,
        finite_sumsq: tf.Tensor,
        state: tf.Tensor,
        bad: tf.Tensor,
        present: np.ndarray,
    ) -> list[tf.Tensor]:
        """Fold this step into the histories (a fixed number of vector ops, whatever the number of variables);
        returns their steps per point, kept in the table's latest globals. ``step`` is ``before + 1``, 1-based."""
        # A norm over the finite gradients is 0 when every present one is non-finite: the history says "no value"
        # then (-inf, null in the report), not a vanishing 0; the same for a layer, and for one with no gradient.
        none, some = np.float64(-np.inf), np.float64(0.0)
        _, n_zero, n_nonfinite = tf.unstack(tf.reduce_sum(bad, axis=1))
        no_global = tf.where(tf.equal(n_nonfinite, float(present.sum())), none, some)
        global_norm = global_norm if present.any() else some  # NaN without gradients: no value either way
        global_values = tf.stack(
            [
                -1.0 * step,  # not -step: a float64 Neg would be one more (op, dtype) pair
                step,
                no_global - global_norm,
                global_norm + no_global,
                np.float64(np.sum(~present & ~self._expected)),
                n_zero,
                n_nonfinite,
            ]
        )
        n_layers = len(self.layers)
        layer_ids = tf.constant(self._layer_ids)  # one constant for the three segment reductions
        present_per_layer = np.bincount(self._layer_ids[present], minlength=n_layers).astype(np.float64)
        layer_nonfinite = tf.math.unsorted_segment_sum(bad[2], layer_ids, n_layers)
        no_layer = tf.where(tf.equal(layer_nonfinite, present_per_layer), none, some)
        layer_norm = tf.sqrt(tf.math.unsorted_segment_sum(finite_sumsq, layer_ids, n_layers))
        expected_missing = ~present & self._expected
        severity = tf.where(expected_missing, state - 0.5, state) if expected_missing.any() else state
        layer_values = [
            no_layer - layer_norm,
            layer_norm + no_layer,
            tf.math.unsorted_segment_max(severity, layer_ids, n_layers),
        ]
        if self.layer_history is None:  # one buffer: the layers' columns follow the global ones, steps shared
            width = self.history.record(before, width, tf.concat([global_values, *layer_values], 0))
            return [width, width]
        return [
            self.history.record(before, width, global_values),
            self.layer_history.record(before, layer_width, tf.concat([global_values[:2], *layer_values], 0)),
        ]

    def snapshot(self) -> Snapshot:
        """One read of the packed variable (safe from any thread while the step runs)."""
        return self.storage.decode(_host_value(self.variable)[0])

    def read_history(self) -> tuple[np.ndarray, np.ndarray]:
        """The optimizer-level and the per-layer history buffers (one read each; each point names its own
        steps, so a read racing a step misplaces nothing)."""
        buffer = self.history.read()
        if self.layer_history is None:  # the step columns are the global ones
            layers = np.concatenate([buffer[:, :2], buffer[:, history.GLOBAL_COLUMNS :]], axis=1)
            return buffer[:, : history.GLOBAL_COLUMNS], layers
        return buffer, self.layer_history.read()
