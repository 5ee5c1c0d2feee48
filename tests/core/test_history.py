"""First bad steps, recoveries and the downsampled history, measured inside real TensorFlow steps.

The expected values are computed here from the gradients fed in (NumPy), never read from gradtel.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
import gradtel.keras
from gradtel import history, stats
from tests.core.helpers import by_name


def test_first_bad_steps_and_recoveries_per_variable():
    a = keras.Variable(np.zeros(3, "float32"), name="a")
    b = keras.Variable(np.zeros(2, "float32"), name="b")
    opt = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(opt, name="states")
    good, zero, nan = tf.constant([1.0, 2.0, 2.0]), tf.zeros(3), tf.constant([np.nan, 0.0, 1.0])
    # step:     1     2     3     4     5    6     7
    plan_a = [good, zero, zero, good, nan, good, nan]
    plan_b = [None, None, tf.ones(2), tf.ones(2), tf.ones(2), None, tf.ones(2)]
    for g_a, g_b in zip(plan_a, plan_b, strict=True):
        opt.apply_gradients([(g_a, a), (g_b, b)])
    records = by_name(handle)
    ra, rb = records["a"], records["b"]
    assert (ra.first_zero_step, ra.recovered_zero_step) == (2, 4)
    assert (ra.first_nonfinite_step, ra.recovered_nonfinite_step) == (5, 6)  # non-finite again at 7: still 6
    assert (ra.first_missing_step, ra.recovered_missing_step) == (0, 0)
    assert (rb.first_missing_step, rb.recovered_missing_step) == (1, 7)
    assert (rb.first_zero_step, rb.first_nonfinite_step) == (0, 0)

    report = gradtel.report()
    entry = {v["name"]: v for v in report["variables"] if v["optimizer"] == "states"}
    assert entry["a"]["first_nonfinite_step"] == 5 and entry["a"]["first_missing_step"] is None
    assert entry["b"]["recovered_missing_step"] == 7
    origin = [f for f in report["findings"] if f["category"] == "nonfinite_origin" and f["optimizer"] == "states"]
    assert origin and origin[0]["step"] == 5 and origin[0]["variables"] == ["a"]
    gradtel.uninstrument(opt)


def _reference(values: np.ndarray, points: int) -> tuple[int, list[tuple[int, int, float, float]]]:
    """Steps per point and (first, last, min, max) per point, by the rule of gradtel/history.py, in NumPy.

    The width is the least power of two that fits the steps in ``points`` points. Once it is 2 or more, the
    ``m`` points begun at this width (after the ``points / 2`` the previous width filled) have each merged one
    pair of the previous width's points: the first ``m`` points are at this width, the previous width's points
    ``2m`` onwards are still at half of it, then come the ``m`` new points.
    """
    steps = len(values)
    width = 1
    while math.ceil(steps / width) > points:
        width *= 2
    if width == 1:
        bounds = [(s, s + 1) for s in range(steps)]
    else:
        half = width // 2
        begun = math.ceil((steps - points * half) / width)
        bounds = [(j * width, (j + 1) * width) for j in range(begun)]
        bounds += [(k * half, (k + 1) * half) for k in range(2 * begun, points)]
        bounds += [(points * half + j * width, points * half + (j + 1) * width) for j in range(begun)]
    out = []
    for start, end in bounds:
        chunk = values[start : min(end, steps)]
        out.append((start + 1, min(end, steps), float(chunk.min()), float(chunk.max())))
    return width, out


@pytest.mark.parametrize("n_layers", [3, 200])  # one shared buffer; a per-layer buffer of its own (fewer points)
def test_history_keeps_first_last_steps_and_extremes(monkeypatch, n_layers):
    monkeypatch.setattr(history, "GLOBAL_POINTS", 16)
    monkeypatch.setattr(history, "MAX_LAYER_POINTS", 16)
    monkeypatch.setattr(history, "MIN_LAYER_POINTS", 4)
    monkeypatch.setattr(history, "LAYER_VALUES", 4000)  # 200 layers: 602 columns, so 4 points
    table = stats.StatsTable(n_layers, f"hist{n_layers}", layers=[f"layer{i}" for i in range(n_layers)])
    assert (table.layer_history is None) == (n_layers == 3)
    update = tf.function(table.update, autograph=False)
    rng = np.random.default_rng(1)
    steps = 203
    norms = rng.uniform(1.0, 2.0, size=steps)
    norms[150] = 1e6  # a spike and a dip that downsampling must keep
    norms[37] = 1e-6
    scale = tf.Variable(0.0)
    for value in norms:
        scale.assign(value)
        # layer0 gets the whole norm; the others a gradient of 0.5 each
        update([tf.reshape(scale, [1])] + [tf.constant([0.5])] * (n_layers - 1))
    global_buffer, layer_buffer = table.read_history()
    snap = table.snapshot()
    decoded = history.decode_global(global_buffer, snap.history_width)
    global_norms = np.sqrt(norms**2 + 0.25 * (n_layers - 1))
    width, expected = _reference(global_norms, 16)
    assert decoded["steps_per_point"] == width == 16
    assert decoded["first_step"] == [e[0] for e in expected] and decoded["last_step"][-1] == steps
    assert decoded["last_step"] == [e[1] for e in expected]
    np.testing.assert_allclose(decoded["global_norm_min"], [e[2] for e in expected], rtol=1e-6)
    np.testing.assert_allclose(decoded["global_norm_max"], [e[3] for e in expected], rtol=1e-6)
    assert max(decoded["global_norm_max"]) == pytest.approx(global_norms.max())

    layers = history.decode_layers(layer_buffer, snap.layer_history_width, table.layers)
    layer_width, layer_expected = _reference(norms, 16 if n_layers == 3 else 4)
    assert layers["steps_per_point"] == layer_width
    assert layers["first_step"] == [e[0] for e in layer_expected]
    first = layers["series"][0]
    assert first["layer"] == "layer0"
    np.testing.assert_allclose(first["norm_min"], [e[2] for e in layer_expected], rtol=1e-6)
    np.testing.assert_allclose(first["norm_max"], [e[3] for e in layer_expected], rtol=1e-6)
    assert layers["series"][-1]["norm_max"] == [0.5] * len(layer_expected)
    assert all(state == "ok" for s in layers["series"] for state in s["state"])


def test_a_million_steps_keep_512_points_with_the_first_last_and_extreme_steps():
    buffer = stats._History(history.GLOBAL_POINTS, 3, "million")
    spike = 654_321

    @tf.function(autograph=False)
    def run(steps: int) -> tf.Tensor:
        def body(before: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            step = before + 1.0
            value = tf.where(tf.equal(step, spike), tf.constant(1e9, tf.float64), tf.math.floormod(step, 97.0))
            return step, buffer.record(before, width, tf.stack([-step, step, value]))

        return tf.while_loop(
            lambda before, _: before < steps, body, (tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64))
        )[1]

    steps = 1_000_000
    width = float(run(steps))
    points = buffer.read()
    points = points[np.argsort(points[:, 1])]
    assert width == 2048 and len(points) == 512 and (points[:, 1] > 0).all()
    assert -points[0, 0] == 1 and points[-1, 1] == steps
    np.testing.assert_array_equal(-points[1:, 0], points[:-1, 1] + 1)  # contiguous: every step is in a point
    holding = points[(-points[:, 0] <= spike) & (points[:, 1] >= spike)]
    assert holding[0, 2] == 1e9 and (points[:, 2] == 1e9).sum() == 1
    values = np.arange(1, steps + 1) % 97.0
    values[spike - 1] = 1e9
    _, expected = _reference(values, history.GLOBAL_POINTS)
    assert [(-p[0], p[1], p[2]) for p in points] == [(e[0], e[1], e[3]) for e in expected]


def test_expected_missing_variables_are_not_counted_as_unhealthy_in_the_history():
    keep = keras.Variable(np.zeros(2, "float32"), name="keep")
    frozen = keras.Variable(np.zeros(2, "float32"), name="frozen")
    cut = keras.Variable(np.zeros(2, "float32"), name="cut")
    opt = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(opt, name="expected", expect_missing=["frozen"])
    for _ in range(3):
        opt.apply_gradients([(tf.ones(2), keep), (None, frozen), (None, cut)])
    glob = handle.history()["global"]
    assert glob["missing"] == [1, 1, 1]
    assert glob["global_norm_max"] == pytest.approx([math.sqrt(2)] * 3)
    states = {s["layer"]: s["state"] for s in handle.history()["layers"]["series"]}
    assert states == {"": ["missing"] * 3}  # one top-level layer: its worst state
    gradtel.uninstrument(opt)


def test_fit_under_xla_keeps_the_history_of_every_step():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(keras.layers.Dense(3, name="hidden")(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=True, steps_per_execution=3)
    callback = gradtel.keras.GradientTelemetry(name="xla_history")
    model.fit(
        np.ones((40, 4), "float32"),
        np.zeros((40, 1), "float32"),
        batch_size=4,
        epochs=2,
        verbose=0,
        callbacks=[callback],
    )
    history_ = callback.handle.history()
    glob = history_["global"]
    assert glob["first_step"] == list(range(1, 21)) and glob["last_step"] == list(range(1, 21))
    assert all(v is not None and v > 0 for v in glob["global_norm_max"])
    assert [s["layer"] for s in history_["layers"]["series"]] == ["hidden", "out"]
    assert {r.name: r.first_nonfinite_step for r in callback.handle.records()} == dict.fromkeys(
        ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"], 0
    )
