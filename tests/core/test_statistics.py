"""The in-graph statistics against independently computed values, in eager, tf.function and XLA steps."""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from gradtel import layout, stats
from tests.core.helpers import by_name, numpy_norm

MODES = ["eager", "function", "jit"]


def make_step(optimizer: keras.optimizers.Optimizer, variables: list, mode: str):
    """A step applying given gradients; None positions stay None (static, like a real disconnected variable)."""

    def step(*grads):
        optimizer.apply_gradients(zip(list(grads), variables, strict=True))

    if mode == "eager":
        return step
    return tf.function(step, jit_compile=(mode == "jit"))


@pytest.fixture
def variables():
    return [
        keras.Variable(np.zeros((3, 4), "float32"), name="w"),
        keras.Variable(np.zeros((4,), "float32"), name="b"),
        keras.Variable(np.zeros((300, 300), "float32"), name="big"),  # above the small-gradient threshold
        keras.Variable(np.zeros((2,), "float32"), name="unused"),
    ]


@pytest.mark.parametrize("max_abs", [True, False], ids=["max_abs", "default"])
@pytest.mark.parametrize("mode", MODES)
def test_norms_counts_and_states_match_independent_computation(variables, mode, max_abs):
    opt = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(opt, name=f"stats-{mode}", max_abs=max_abs, start_exporter=False)
    step = make_step(opt, variables, mode)
    rng = np.random.default_rng(1)
    steps = [
        [rng.normal(size=(3, 4)), rng.normal(size=(4,)), rng.normal(size=(300, 300))],
        [np.zeros((3, 4)), rng.normal(size=(4,)) * 1e-15, rng.normal(size=(300, 300))],  # zero; small but not zero
        [rng.normal(size=(3, 4)), np.full((4,), np.nan), np.full((300, 300), np.inf)],
        [rng.normal(size=(3, 4)) * 1e3, rng.normal(size=(4,)), rng.normal(size=(300, 300))],
    ]
    for grads in steps:
        step(*[tf.constant(g, tf.float32) for g in grads], None)

    records = by_name(handle)
    last = [np.asarray(g, np.float32) for g in steps[-1]]
    for name, g in zip(["w", "b", "big"], last, strict=True):
        assert records[name].norm == pytest.approx(numpy_norm(g), rel=1e-5)
        if max_abs:
            assert records[name].max_abs == pytest.approx(float(np.max(np.abs(g))), rel=1e-6)
        else:
            assert math.isnan(records[name].max_abs)  # not measured: no gauge is exported for it
        assert records[name].state == "ok"
        assert records[name].steps == 4
        assert records[name].missing_steps == 0
    assert (records["w"].zero_steps, records["b"].zero_steps, records["big"].zero_steps) == (1, 0, 0)
    assert (records["w"].nonfinite_steps, records["b"].nonfinite_steps, records["big"].nonfinite_steps) == (0, 1, 1)
    assert records["unused"].missing_steps == 4
    assert records["unused"].state == "missing"
    assert math.isnan(records["unused"].norm)

    steps_seen, global_norm = handle.totals()
    assert steps_seen == 4
    expected_global = float(tf.linalg.global_norm([tf.constant(g) for g in last]))
    assert global_norm == pytest.approx(expected_global, rel=1e-5)
    gradtel.uninstrument(opt)


@pytest.mark.parametrize("mode", MODES)
def test_indexed_slices_norm_is_exact_with_repeated_indices(mode):
    table = keras.Variable(np.zeros((50, 3), "float32"), name="embedding")
    opt = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(opt, name=f"embed-{mode}", max_abs=True, start_exporter=False)
    step = make_step(opt, [table], mode)
    values = tf.constant(np.arange(15, dtype="float32").reshape(5, 3) - 7.0)
    indices = tf.constant([4, 9, 4, 4, 30])  # row 4 three times: its gradient is the SUM of three slices
    slices = tf.IndexedSlices(values, indices, tf.constant([50, 3]))
    step(slices)

    record = by_name(handle)["embedding"]
    dense = tf.convert_to_tensor(slices)  # TensorFlow's own densification sums repeated rows
    assert record.norm == pytest.approx(numpy_norm(dense), rel=1e-6)
    assert record.norm != pytest.approx(float(np.linalg.norm(values.numpy())), rel=1e-3)
    assert record.max_abs == pytest.approx(float(np.max(np.abs(dense.numpy()))))
    assert record.rows_touched == 3
    gradtel.uninstrument(opt)


def table_record(grads: list, fn=tf.function, max_abs: bool = True) -> np.ndarray:
    """Run StatsTable.update directly (dtypes an optimizer would not accept) and return the rows."""
    table = stats.StatsTable(len(grads), "direct", max_abs=max_abs)
    fn(table.update)(grads)
    return table.snapshot().rows


def test_float16_is_measured_in_float32_and_underflow_shows_as_zero():
    g = np.array([60000.0, 60000.0, -3.0], np.float16)  # its sum of squares overflows float16
    underflowed = tf.cast(tf.constant([1e-9, -1e-9]), tf.float16)  # 0 in float16
    rows = table_record([tf.constant(g), underflowed])
    assert rows[layout.NORM, 0] == pytest.approx(numpy_norm(g.astype(np.float64)), rel=1e-6)
    assert rows[layout.MAX_ABS, 0] == 60000.0
    assert rows[layout.NONFINITE, 0] == 0
    assert rows[layout.ZERO, 1] == 1


@pytest.mark.parametrize("max_abs", [False, True], ids=["default", "max_abs"])
def test_float32_edges_are_documented_by_default_and_exact_with_max_abs(max_abs):
    """gradtel.stats: by default a float32 gradient below ~1e-19 squares to 0 and counts as zero, and a norm beyond
    ~1.8e19 overflows float32 and counts as non-finite; with max_abs both are measured exactly. Float64 gradients
    are measured in float64 either way."""
    tiny, small = np.full((8,), 1e-25, np.float32), np.full((8,), 1e-15, np.float32)
    huge = np.full((1000,), 3e19, np.float32)  # finite elements whose squares overflow float32
    rows = table_record(
        [tf.constant(tiny), tf.constant(small), tf.constant(huge), tf.constant(huge, tf.float64)], max_abs=max_abs
    )
    assert list(rows[layout.ZERO]) == ([0, 0, 0, 0] if max_abs else [1, 0, 0, 0])
    assert list(rows[layout.NONFINITE]) == ([0, 0, 0, 0] if max_abs else [0, 0, 1, 0])
    assert rows[layout.NORM, 1] == pytest.approx(numpy_norm(small), rel=1e-6)
    assert rows[layout.NORM, 3] == pytest.approx(numpy_norm(huge.astype(np.float64)), rel=1e-12)
    if max_abs:
        assert rows[layout.NORM, 0] == pytest.approx(numpy_norm(tiny), rel=1e-6)
        assert rows[layout.NORM, 2] == pytest.approx(numpy_norm(huge), rel=1e-6)
        assert list(rows[layout.MAX_ABS]) == pytest.approx([1e-25, 1e-15, 3e19, 3e19], rel=1e-6)
    else:
        assert np.isnan(rows[layout.MAX_ABS]).all()


def test_empty_gradient_counts_as_zero_not_nonfinite():
    rows = table_record([tf.zeros((0, 4))])
    assert (rows[layout.ZERO, 0], rows[layout.NONFINITE, 0], rows[layout.NORM, 0]) == (1, 0, 0)
    assert rows[layout.MAX_ABS, 0] == 0


def test_step_graph_holds_only_numeric_ops():
    """XLA-safe and no host round trip: no print, py_function, numpy_function or summary op in the step."""
    variables = [keras.Variable(np.zeros((3,), "float32"), name="v")]
    opt = keras.optimizers.Adam()
    gradtel.instrument(opt, name="graph-ops", start_exporter=False)
    step = make_step(opt, variables, "function")
    graph = step.get_concrete_function(tf.TensorSpec((3,), tf.float32)).graph
    op_types = {op.type for op in graph.get_operations()}
    for fn in graph._functions.values():
        op_types |= {node.op for node in fn.definition.node_def}
    forbidden = {
        "PrintV2",
        "Print",
        "PyFunc",
        "EagerPyFunc",
        "PyFuncStateless",
        "WriteSummary",
        "WriteScalarSummary",
        "WriteHistogramSummary",
    }
    assert not op_types & forbidden
    assert "L2Loss" in op_types  # gradtel's statistics are in the step
    gradtel.uninstrument(opt)


@pytest.mark.parametrize("max_abs", [False, True])
def test_the_update_reads_its_variables_without_read_variable_op(max_abs):
    """A ReadVariableOp in the step made the first call's graph optimisation 15-24 % slower (gradtel.stats._read_rows):
    the update reads the table and the history by gather only, and still folds two steps correctly."""
    table = stats.StatsTable(3, f"noread{max_abs}", max_abs=max_abs, layers=["a", "a", "b"])
    grads = [tf.constant([3.0, 4.0]), None, tf.constant([0.0])]
    update = tf.function(lambda: table.update(grads), autograph=False)
    op_types = {op.type for op in update.get_concrete_function().graph.get_operations()}
    assert "ReadVariableOp" not in op_types and "ResourceGather" in op_types
    update()
    update()
    snap = table.snapshot()
    assert snap.steps == 2 and snap.rows[layout.NORM, 0] == pytest.approx(5.0)
    assert list(snap.rows[layout.MISSING]) == [0, 2, 0] and list(snap.rows[layout.ZERO]) == [0, 0, 2]
    assert list(snap.rows[layout.FIRST_ZERO]) == [0, 0, 1] and list(snap.rows[layout.FIRST_MISSING]) == [0, 1, 0]


#: Every (op type, dtype) the default update may use. With oneDNN on, a function's first call scans TensorFlow's kernel
#: registry for each pair its thread has not met yet (gradtel.stats, module docstring): a new pair is a start-up cost
#: of about 1-2 ms in every job, so one is added here only on purpose.
UPDATE_PAIRS = {
    *(
        (op, "float64")
        for op in (
            "AddV2", "Sub", "Mul", "Maximum", "SelectV2", "Equal", "Sum", "Sqrt", "FloorDiv", "FloorMod",
            "UnsortedSegmentSum", "UnsortedSegmentMax", "SplitV", "Reshape", "ConcatV2",
        )
    ),
    *((op, "float32") for op in ("Pack", "Square", "Sum", "L2Loss", "Mul", "ConcatV2")),
}  # fmt: skip


#: What an IndexedSlices gradient adds: its repeated rows merged (gradtel.stats._as_measurable) and counted.
SPARSE_PAIRS = {
    ("Unique", "int32"),
    ("Shape", "int32"),
    ("StridedSlice", "int32"),
    ("Pack", "int32"),
    ("TensorScatterUpdate", "int32"),
    ("UnsortedSegmentSum", "float32"),
}
#: What ``max_abs`` adds (opt-in, about twice the cost): max |g|, and the ``cond`` that recomputes in float64 a sum
#: of squares that over- or underflowed in float32 (its branches are lowered into the step at the first call).
MAX_ABS_PAIRS = {
    ("Abs", "float32"),
    ("Max", "float32"),
    ("Reshape", "float32"),
    ("IsInf", "float64"),
    ("IsFinite", "float64"),
    ("Greater", "float64"),
    ("Square", "float64"),
    ("Identity", "float64"),
}


def _pairs(graph_def):
    """The (op type, dtype) of every node with a ``T`` attribute (the ones the oneDNN pass looks up), in the graph
    and in the functions it calls (a ``cond``'s branches)."""
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    return {(n.op, tf.as_dtype(n.attr["T"].type).name) for n in nodes if n.attr["T"].type}


@pytest.mark.parametrize("case", ["dense", "sparse", "max_abs"])
def test_the_update_keeps_to_a_few_op_types_per_dtype(case):
    """Stacked and single, present and missing gradients: the update's (op type, dtype) pairs stay within
    UPDATE_PAIRS, plus SPARSE_PAIRS for an IndexedSlices gradient and MAX_ABS_PAIRS on the max_abs path."""
    table = stats.StatsTable(6, f"pairs_{case}", max_abs=case == "max_abs", layers=["a", "a", "b", "b", "c", "c"])
    sparse = case == "sparse"
    last = tf.IndexedSlices(tf.ones([2, 3]), tf.constant([0, 2]), tf.constant([4, 3])) if sparse else tf.ones([7])
    grads = [tf.ones([4]), tf.ones([4]), None, tf.ones([300, 3]), tf.ones([5]), last]
    update = tf.function(lambda: table.update(grads), autograph=False)
    pairs = _pairs(update.get_concrete_function().graph.as_graph_def())
    allowed = {"dense": set(), "sparse": SPARSE_PAIRS, "max_abs": MAX_ABS_PAIRS}[case]
    assert pairs == UPDATE_PAIRS | allowed  # no new pair, and no listed one unused (the lists stay exact)
    update()
    assert table.snapshot().rows[layout.NORM, 0] == pytest.approx(2.0)


@pytest.mark.parametrize("loss_scaled", [False, True])
def test_the_update_makes_each_constant_once(loss_scaled):
    """A graph node costs at a first call whatever it holds (gradtel.stats, module docstring), so the update makes
    one ``Const`` per distinct value: none repeats (at 100 variables it held 79 of about 20 values)."""
    table = stats.StatsTable(
        6, f"consts_{loss_scaled}", layers=["a", "a", "b", "b", "c", "c"], expected=[False] * 5 + [True]
    )
    grads = [tf.ones([4]), tf.ones([4]), tf.ones([300, 3]), tf.ones([5])]  # arguments: captured, they are constants

    @tf.function(autograph=False)
    def update(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, d: tf.Tensor) -> None:
        table.update([a, b, None, c, d, None], loss_scaled=loss_scaled)

    graph = update.get_concrete_function(*grads).graph
    values = [tf.make_ndarray(op.get_attr("value")) for op in graph.get_operations() if op.type == "Const"]
    keys = [(v.dtype.str, v.shape, v.tobytes()) for v in values]
    assert len(values) > 10 and len(set(keys)) == len(keys), sorted(keys)
    update(*grads)
    assert table.snapshot().rows[layout.NORM, 3] == pytest.approx(math.sqrt(900))


def test_graph_grows_with_distinct_shapes_not_with_variables():
    """The cost model in gradtel.stats: shape-alike small gradients are stacked and reduced together, so the graph
    grows by a fixed number of ops per distinct shape; a gradient of a shape of its own costs one L2Loss."""

    def ops(shapes: list[tuple[int, ...]], max_abs: bool) -> int:
        table = stats.StatsTable(len(shapes), f"count{len(shapes)}{max_abs}{len(set(shapes))}", max_abs=max_abs)
        fn = tf.function(lambda: table.update([tf.ones(s) * i for i, s in enumerate(shapes)]), autograph=False)
        return len(fn.get_concrete_function().graph.get_operations()) - 3 * len(shapes)  # minus const, const, mul

    for max_abs in (False, True):
        assert ops([(4, 4)] * 40, max_abs) == ops([(4, 4)] * 20, max_abs)  # one stack either way
    assert ops([(i + 1,) for i in range(40)], False) - ops([(i + 1,) for i in range(20)], False) == 20


def test_stacked_norms_equal_numpy_across_chunks_dtypes_and_missing():
    """Many shape-alike gradients are reduced in several stacks (a stack's transient copy is bounded); the norms,
    zero and missing rows land on the right variables whatever the grouping."""
    rng = np.random.default_rng(7)
    shape = (16, 16)  # at the stacking limit: 64 per stack, so 150 of them make three stacks
    values = [rng.normal(size=shape).astype(np.float32) * (i % 5) for i in range(150)]
    grads: list = [tf.constant(v) for v in values]
    grads[3] = None
    grads[77] = None
    grads += [
        tf.constant(rng.normal(size=(3,)), tf.float16),
        tf.constant(rng.normal(size=(3,)), tf.float16),
        tf.constant(rng.normal(size=(5, 5)), tf.float64),
        tf.constant(rng.normal(size=(300, 300)), tf.float32),
    ]
    table = stats.StatsTable(len(grads), "chunked")
    tf.function(lambda: table.update(grads), autograph=False)()
    snap = table.snapshot()
    for i, g in enumerate(grads):
        if g is None:
            assert snap.rows[layout.MISSING][i] == 1 and np.isnan(snap.rows[layout.NORM][i])
            continue
        expected = np.linalg.norm(g.numpy().astype(np.float64))
        np.testing.assert_allclose(snap.rows[layout.NORM][i], expected, rtol=1e-3 if g.dtype == tf.float16 else 1e-6)
        assert snap.rows[layout.ZERO][i] == (expected == 0)


def test_max_abs_setting_is_validated(monkeypatch, caplog):
    monkeypatch.setenv("GRADTEL_MAX_ABS", "maybe")
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        opt = keras.optimizers.SGD()
        assert not gradtel.instrument(opt, name="bad-max-abs", start_exporter=False).max_abs  # the default
        gradtel.uninstrument(opt)
    assert any(
        "GRADTEL_MAX_ABS='maybe': expected true or false; using the default, false." in r.message
        for r in caplog.records
    )
    monkeypatch.setenv("GRADTEL_MAX_ABS", "on")
    opt = keras.optimizers.SGD()
    assert gradtel.instrument(opt, name="max-abs-on", start_exporter=False).max_abs
    gradtel.uninstrument(opt)
