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
process). So the update keeps to 15 float64 pairs and the float32 sums of squares (it used 37 pairs: 48 ms of a
100-variable model's first call; 18 pairs 28 ms): add, subtract, multiply, max, select, equal, sum, square root,
floor division and modulo, two segment reductions, splitting, reshaping and concatenating; no ``IsFinite``, ``Neg``,
``Pack``, ``Unpack``, slice, logarithm or bit operation. tests/core/test_statistics.py holds the list
(docs/benchmarks.md, "A first call's fixed cost").
Zero and non-finite are then read off the float32 sum of squares: "zero" is a gradient whose every element squares
to 0 in float32 (|g| below ~1e-19, too small for any optimizer to move the variable), "non-finite" one holding
NaN/Inf or whose sum of squares overflows float32 (a norm above ~1.8e19: an exploding gradient, on which Adam's own
float32 squares overflow too). Float64 gradients are measured in float64.

``max_abs`` (``instrument(max_abs=True)`` or ``GRADTEL_MAX_ABS=true``) adds max |g| per variable and makes those
edges exact (a finite gradient whose float32 squares over- or underflowed is recomputed in float64), at about
twice the cost on a model of many small layers; it stacks shape-alike gradients up to 65,536 elements.

The same update keeps, per variable, the step at which each bad state first appeared and the latest return to
health (vector ops on the table's own rows), and folds the step into the run's downsampled history (a two-row read
and one scatter into another gradtel-owned variable, with no control flow; gradtel/history.py says how and why).
The whole update is about 100 graph nodes at 100 variables of one shape, half of them the history's; it grows with
the distinct shapes and the large gradients, not with the variables. Nodes, not only kinds, cost at a first call: a
node is built from Python (~0.13 ms) and optimised and set up again when the function first runs, a constant as much
as an op. So each distinct constant is one node
(``_Constants``) and the table's row is cut by one ``SplitV``: at 100 variables the update had 172 nodes, 79 of them
constants (docs/benchmarks.md, "Fewer nodes").
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


class _Constants:
    """One graph node per distinct constant value of one update (made in one graph: one trace, or one eager call).

    Why: every literal in ``tf.where(x, 0.0, y)`` or a slice's bounds is a ``Const`` node of its own, and a node costs
    as much as an op to build from Python and again at the function's first call (module docstring).
    """

    def __init__(self) -> None:
        self._made: dict[tuple[str, tuple[int, ...], bytes], tf.Tensor] = {}

    def __call__(self, value: Any, dtype: tf.DType = tf.float64) -> tf.Tensor:
        array = np.asarray(value, dtype.as_numpy_dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._made:
            self._made[key] = tf.constant(array)
        return self._made[key]

    def axis(self, value: Any) -> tf.Tensor:
        """An int32 axis, shape or size list."""
        return self(value, tf.int32)


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

    def in_table_order(self, values: tf.Tensor, filler: float, constants: _Constants) -> tf.Tensor:
        """``values`` (one per gradient in ``order``) as a float64 vector in table order, ``filler`` where missing."""
        if self.order == list(range(self.n)):  # nothing missing and nothing moved: no gather (and no index constant)
            return tf.cast(values, tf.float64)
        index = np.full(self.n, len(self.order), np.int32)  # missing ones point at the trailing filler
        index[self.order] = np.arange(len(self.order), dtype=np.int32)
        values = tf.concat([tf.cast(values, tf.float64), constants([filler])], constants.axis(0))
        return tf.gather(values, constants.axis(index), axis=constants.axis(0))


def _assemble(parts: Sequence[tf.Tensor], constants: _Constants) -> tf.Tensor:
    """Vectors of possibly different float dtypes as one vector (one cast after the concat when they agree)."""
    if len({p.dtype for p in parts}) == 1:
        return tf.concat(parts, axis=constants.axis(0)) if len(parts) > 1 else parts[0]
    return tf.concat([tf.cast(p, tf.float64) for p in parts], axis=constants.axis(0))


def _finite(values: tf.Tensor, constants: _Constants) -> tf.Tensor:
    """Where ``values`` (float64) are finite: ``x - x`` is 0 for a finite x and NaN for NaN or +-inf.

    Not ``tf.math.is_finite``: one more (op type, dtype) pair for the first call to look up (module docstring).
    """
    return tf.equal(values - values, constants(0.0))


def _sums_of_squares(measured: Sequence[tf.Tensor | None], constants: _Constants) -> tf.Tensor:
    """Sum of squares of each gradient as one float64 vector in table order (NaN where the gradient is missing:
    its norm is NaN, "no value", and the state says missing).

    Stacks are squared and summed in their own (float32) precision, so "zero" and "non-finite" mean the same as
    for the gradients reduced one by one with ``L2Loss`` (sum(t**2) / 2, TensorFlow's cheapest whole-tensor
    reduction).
    """
    groups = _Groups(measured, STACK_ELEMENTS)
    parts = [tf.reduce_sum(tf.square(stack), axis=constants.axis(groups.axes(stack))) for _, stack in groups.stacks]
    if groups.single:
        halves = [tf.nn.l2_loss(_as_float(measured[i])) for i in groups.single]
        dtypes = {h.dtype for h in halves}
        dtype = dtypes.pop() if len(dtypes) == 1 else tf.float64  # one cast after the stack when they all agree
        parts.append(constants(2.0, dtype) * tf.stack([h if h.dtype == dtype else tf.cast(h, dtype) for h in halves]))
    return groups.in_table_order(_assemble(parts, constants), np.nan, constants)


def _exact_reduce(measured: Sequence[tf.Tensor | None], constants: _Constants) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of squares and max |g| of each gradient, as two float64 vectors in table order (NaN where missing),
    exact at float32's edges: the ``max_abs`` path.

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

    sumsq = tf.cast(_assemble(sumsq_parts, constants), tf.float64)
    maxabs = tf.cast(_assemble(maxabs_parts, constants), tf.float64)
    maxabs = tf.maximum(maxabs, 0.0)  # an empty gradient's max is -inf: 0
    overflow = tf.logical_and(tf.math.is_inf(sumsq), tf.math.is_finite(maxabs))
    underflow = tf.logical_and(tf.equal(sumsq, 0.0), maxabs > 0.0)
    inexact = tf.reduce_any(tf.logical_or(overflow, underflow))

    def exact() -> tf.Tensor:  # a branch is a graph of its own, with its own constants
        return tf.cast(_assemble([f() for f in exact_parts], _Constants()), tf.float64)

    sumsq = tf.cond(inexact, exact, lambda: sumsq)
    return groups.in_table_order(sumsq, np.nan, constants), groups.in_table_order(maxabs, np.nan, constants)


def _rows_touched(measured: Sequence[tuple[tf.Tensor, tf.Tensor | None] | None], constants: _Constants) -> tf.Tensor:
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
        return tf.cast(constants(static, tf.as_dtype(static.dtype)), tf.float64)
    indices = tf.constant([[i] for i, _ in dynamic])
    counts = tf.cast(tf.stack([d for _, d in dynamic]), static.dtype)
    return tf.cast(
        tf.tensor_scatter_nd_update(constants(static, tf.as_dtype(static.dtype)), indices, counts), tf.float64
    )


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


def _read_rows(variable: tf.Variable, rows: tf.Tensor) -> tf.Tensor:
    """Rows of a gradtel variable (one row, without its axis, for a scalar index), read in the step by
    ``ResourceGather``, never by ``ReadVariableOp``.

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

    def record(
        self, before: tf.Tensor, width: tf.Tensor, values: tf.Tensor, constants: _Constants | None = None
    ) -> tf.Tensor:
        """Fold the values (one per column) of the step after the first ``before`` steps into its point; returns
        the steps per point from now on (``width`` until the buffer fills, then doubled). ``before`` and ``width``
        are scalars or one-element vectors.

        Point ``b`` (0-based, steps ``[b*w + 1, (b+1)*w]``) lives in the slot ``b`` rotated left by ``log2(w)``
        bits. When the buffer is full the width doubles and the next step falls on point ``P/2``; from then on
        the first step of each new point ``P/2 + j`` first merges the old pair ``2j, 2j + 1`` (timeline-adjacent
        at the old width) into the slot of new point ``j`` and empties the other one of the pair, which is new
        point ``P/2 + j``'s own slot. By the last new point every pair is merged, so the next doubling finds the
        same layout one rotation on. Every point names its own steps, so a read between merges is exact too.
        Per step: two rows read and written back by one scatter (outside a merge, both are this point's row), a
        few scalar ops, and no control flow.

        The slots are float64 arithmetic, not bit operations or a logarithm: each (op type, dtype) pair is a cost
        the first call pays (module docstring), so the history uses the update's own few.
        ``w mod (P - 1)`` is ``2 ** (log2(w) mod log2(P))`` (``2 ** log2(P)`` is 1 modulo ``P - 1``), and a point
        ``p < P`` rotated left by those bits is ``p * 2**t mod P + p * 2**t // P``: every value an exact integer.
        """
        c = constants or _Constants()
        points = float(self.points)
        width = tf.where(tf.equal(before, c(points) * width), c(2.0) * width, width)  # a full buffer: doubled
        rotation = tf.math.floormod(width, c(points - 1.0))
        point = tf.math.floordiv(before, width)  # < points
        # The first step of a point after a doubling: ``before`` a multiple of a width of 2 or more.
        merging = tf.equal(tf.maximum(tf.math.floormod(before, width), c(2.0) - width), c(0.0))
        # [while merging the merged pair's new point (``point - P/2``), else this point; this point]
        pair = point - c([self.points // 2, 0.0]) * tf.cast(merging, tf.float64)
        shifted = pair * rotation
        indices = tf.cast(tf.math.floormod(shifted, c(points)) + tf.math.floordiv(shifted, c(points)), tf.int32)
        first, second = tf.split(_read_rows(self.variable, indices), c.axis([1, 1]), c.axis(0))  # [1, columns]
        this = tf.maximum(tf.where(merging, c(-np.inf), second), values)  # emptied by a merge, then this step's
        merged = tf.where(merging, tf.maximum(first, second), this)
        # The raw op on the handle: under a strategy, this replica's own copy.
        rows = tf.concat([merged, this], c.axis(0))
        tf.raw_ops.ResourceScatterUpdate(resource=self.variable.handle, indices=indices, updates=rows)
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
        c = _Constants()
        present = np.array([g is not None for g in grads])
        measured = [None if g is None else _as_measurable(g) for g in grads]
        dense = [None if m is None else m[0] for m in measured]
        max_abs: tf.Tensor | None = None  # not measured
        if not present.any():
            sumsq = tf.fill(c.axis([self.n]), c(np.nan))
        elif self.max_abs:
            sumsq, max_abs = _exact_reduce(dense, c)
        else:
            sumsq = _sums_of_squares(dense, c)  # NaN where missing
        # The table's one row (see _read_rows), cut into the pieces this step adds to, replaces or folds by max.
        before, skipped, counts, _, width, layer_width, _, old_max_abs, _, old_state, old_folded = tf.split(
            _read_rows(self.variable, c.axis(0)), c.axis(self.storage.pieces), c.axis(0)
        )
        step = before + c(1.0)  # this step, 1-based (one-element vectors, like every global here)
        # A missing gradient's NaN is overridden by the missing state. On the max_abs path a finite gradient whose
        # float32 squares overflowed was recomputed in float64, so only NaN/Inf elements leave its sum non-finite.
        finite = _finite(sumsq, c)
        ok_or_zero = tf.where(tf.equal(sumsq, c(0.0)), c(STATE_ZERO), c(STATE_OK))
        state = tf.where(finite, ok_or_zero, c(STATE_NONFINITE))
        if not present.all():
            state = tf.where(c(~present, tf.bool), c(STATE_MISSING), state)
        bad = tf.cast(tf.equal(state, c(_BAD_STATES)), tf.float64)  # [3, n]: 1.0 where missing / zero / non-finite
        nonfinite = tf.cast(tf.equal(state, c(STATE_NONFINITE)), tf.float64)  # bad's last row (no float64 Unpack)
        counted = bad
        if loss_scaled:
            skip = tf.reduce_max(nonfinite, axis=c.axis(0), keepdims=True)
            counted = bad * (c(1.0) - c(_BAD_STATES == STATE_NONFINITE) * skip)  # the non-finite row not counted
            skipped = skipped + skip
        # Over the finite gradients: a NaN would hide the norm of every other variable (and OpenTelemetry drops
        # non-finite observations); non-finite gradients are counted on their own.
        finite_sumsq = tf.where(finite, sumsq, c(0.0))
        global_norm = tf.sqrt(tf.reduce_sum(finite_sumsq, axis=c.axis(0), keepdims=True)) if present.any() else None
        norm = tf.sqrt(sumsq)  # NaN where missing
        widths = self._record_history(
            c, before, step, width, layer_width, global_norm, finite_sumsq, state, bad, nonfinite, present
        )
        latest = [
            c([np.nan]) if global_norm is None else global_norm,
            *widths,
            norm,
            old_max_abs if max_abs is None else max_abs,  # not measured: the NaNs the table started with
            _rows_touched(measured, c),
            state,
        ]
        counts = counts + tf.reshape(counted, c.axis([-1]))
        folded = self._first_and_recovered(c, old_state, old_folded, step, state, counted)
        row = tf.concat([step, skipped, counts, *latest, folded], c.axis(0))
        self.variable.assign(tf.reshape(row, c.axis([1, -1])), read_value=False)

    @staticmethod
    def _first_and_recovered(
        c: _Constants, old_state: tf.Tensor, old: tf.Tensor, step: tf.Tensor, state: tf.Tensor, bad: tf.Tensor
    ) -> tf.Tensor:
        """The six rows FIRST_MISSING..RECOVERED_NONFINITE, flattened, each the max of its old value and this step's.

        A first bad step is stored as ``FIRST_BASE - step``, so the max keeps the earliest one; a recovery (a step
        whose state is ok right after a step in that state: ``old_state``, the STATE row of the previous step) as
        the step, so the max keeps the latest. Every variable of a table is seen at each of its steps. ``bad`` is
        counted: a loss-scale optimizer's routine overflow sets no first non-finite step, and the reader ignores a
        recovery from a state whose first step was never set.
        """
        was = tf.cast(tf.equal(old_state, c(_BAD_STATES)), tf.float64)
        recovered = was * tf.where(tf.equal(state, c(STATE_OK)), step, c(0.0))
        now = tf.reshape(tf.concat([bad * (c(FIRST_BASE) - step), recovered], c.axis(0)), c.axis([-1]))
        return tf.maximum(old, now)

    def _record_history(
        self,
        c: _Constants,
        before: tf.Tensor,
        step: tf.Tensor,
        width: tf.Tensor,
        layer_width: tf.Tensor,
        global_norm: tf.Tensor | None,
        finite_sumsq: tf.Tensor,
        state: tf.Tensor,
        bad: tf.Tensor,
        nonfinite: tf.Tensor,
        present: np.ndarray,
    ) -> list[tf.Tensor]:
        """Fold this step into the histories (a fixed number of vector ops, whatever the number of variables);
        returns their steps per point, kept in the table's latest globals. ``step`` is ``before + 1``, 1-based;
        ``global_norm`` None: no gradient at all."""
        # A norm over the finite gradients is 0 when every present one is non-finite: the history says "no value"
        # then (-inf, null in the report), not a vanishing 0; the same for a layer, and for one with no gradient.
        none, some = c(-np.inf), c(0.0)
        per_state = tf.reduce_sum(bad, axis=c.axis(1))  # missing, zero, non-finite
        all_nonfinite = tf.equal(tf.gather(per_state, c.axis([2, 2]), axis=c.axis(0)), c(float(present.sum())))
        signs = c([-1.0, 1.0])  # [-x, x]: a minimum is kept negated, so that every column merges by max
        steps = signs * step
        expected_missing = ~present & self._expected
        unexpected = per_state - c([expected_missing.sum(), 0.0, 0.0]) if expected_missing.any() else per_state
        global_values = [
            steps,  # the point's first step (negated) and last step
            signs * (some if global_norm is None else global_norm) + tf.where(all_nonfinite, none, some),
            unexpected,  # the unexpectedly missing, the all-zero and the non-finite variables
        ]
        n_layers = len(self.layers)
        layer_ids, segments = c.axis(self._layer_ids), c.axis(n_layers)  # shared by the three segment reductions
        present_per_layer = np.bincount(self._layer_ids[present], minlength=n_layers).astype(np.float64)
        layer_nonfinite = tf.math.unsorted_segment_sum(nonfinite, layer_ids, segments)
        no_layer = tf.where(tf.equal(layer_nonfinite, c(present_per_layer)), none, some)
        layer_norm = tf.sqrt(tf.math.unsorted_segment_sum(finite_sumsq, layer_ids, segments))
        severity = tf.where(c(expected_missing, tf.bool), state - c(0.5), state) if expected_missing.any() else state
        layer_values = [
            no_layer - layer_norm,
            layer_norm + no_layer,
            tf.math.unsorted_segment_max(severity, layer_ids, segments),
        ]
        if self.layer_history is None:  # one buffer: the layers' columns follow the global ones, steps shared
            width = self.history.record(before, width, tf.concat([*global_values, *layer_values], c.axis(0)), c)
            return [width, width]
        return [
            self.history.record(before, width, tf.concat(global_values, c.axis(0)), c),
            self.layer_history.record(before, layer_width, tf.concat([steps, *layer_values], c.axis(0)), c),
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
