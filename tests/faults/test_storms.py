"""Gradient storms: every step non-finite for 10,000 steps, norms at the edge of float32, half precision.

A storm is when telemetry matters most and when it could hurt most (a warning per step floods the logs and
slows the step). The 10,000 steps run in ONE tf.function (a ``tf.range`` loop over tiny tensors) so they take
seconds; the counts are then compared exactly, in the handle and in a real scrape.
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from tests.faults.helpers import parse, scrape_body, values

STORM_STEPS = 10_000


def test_ten_thousand_non_finite_steps_are_counted_exactly_without_a_log_flood(exporter, caplog):
    port = exporter(run_id="storm").endpoint[1]
    nan_v = keras.Variable(np.ones(3, "float32"), name="nan_v")
    inf_v = keras.Variable(np.ones(2, "float32"), name="inf_v")
    fine = keras.Variable(np.ones(2, "float32"), name="fine")
    cut = keras.Variable(np.ones(1, "float32"), name="cut")
    optimizer = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(optimizer, name="storm")
    optimizer.build([nan_v, inf_v, fine, cut])
    grads = [tf.constant([np.nan, 1.0, 2.0]), tf.constant([np.inf, -1.0]), tf.constant([3.0, 4.0]), None]

    @tf.function
    def storm(n: tf.Tensor) -> None:
        for _ in tf.range(n):
            optimizer.apply_gradients(zip(grads, [nan_v, inf_v, fine, cut], strict=True))

    with caplog.at_level(logging.DEBUG, logger="gradtel"):
        storm(tf.constant(STORM_STEPS))
        families = parse(scrape_body(port))
    gradtel.uninstrument(optimizer)

    records = {r.name: r for r in handle.records()}
    assert handle.totals()[0] == STORM_STEPS == int(optimizer.iterations.numpy())
    assert (records["nan_v"].nonfinite_steps, records["inf_v"].nonfinite_steps) == (STORM_STEPS, STORM_STEPS)
    assert (records["fine"].nonfinite_steps, records["fine"].steps, records["fine"].norm) == (0, STORM_STEPS, 5.0)
    assert records["cut"].missing_steps == STORM_STEPS
    assert (records["nan_v"].state, records["inf_v"].state) == ("nonfinite", "nonfinite")
    assert math.isnan(records["nan_v"].norm) and math.isinf(records["inf_v"].norm)
    # The scrape says the same; as documented, non-finite norms are left out and the global norm covers the
    # finite gradients only, so the storm does not hide the healthy variable.
    labels = {"optimizer": "storm"}
    assert values(families, "gradtel_steps", **labels) == {(None, "storm"): STORM_STEPS}
    nonfinite = values(families, "gradtel_gradient_nonfinite", **labels)
    assert nonfinite == {
        ("nan_v", "storm"): STORM_STEPS,
        ("inf_v", "storm"): STORM_STEPS,
        ("fine", "storm"): 0,
        ("cut", "storm"): 0,
    }
    assert values(families, "gradtel_gradient_norm", **labels) == {("fine", "storm"): 5.0}
    assert values(families, "gradtel_gradient_global_norm", **labels) == {(None, "storm"): 5.0}
    states = {s.labels["state"]: s.value for s in families["gradtel_variables"] if s.labels["optimizer"] == "storm"}
    assert (states["nonfinite"], states["ok"], states["missing"]) == (2, 1, 1)
    # gradtel's own log output stays bounded however long the storm lasts (it is counted, not logged per step).
    assert len([r for r in caplog.records if r.name.startswith("gradtel")]) <= 2


def _measure(grad: np.ndarray, dtype: tf.DType, name: str, max_abs: bool = True) -> gradtel.VariableRecord:
    var = keras.Variable(np.zeros(grad.shape, dtype.as_numpy_dtype), name=name, dtype=dtype.name)
    optimizer = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(optimizer, name=f"edge-{name}", max_abs=max_abs, start_exporter=False)
    optimizer.apply_gradients([(tf.constant(grad, dtype), var)])
    gradtel.uninstrument(optimizer)
    (record,) = handle.records()
    return record


def _exact_norm(grad: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(grad.astype(np.float64)))))


@pytest.mark.parametrize(
    "grad",
    [
        np.full(8, np.finfo(np.float32).max, np.float32),  # every square overflows float32
        np.array([3e38, -3e38, 1.0], np.float32),
        np.array([2e19, 2e19, 2e19], np.float32),  # the squares are finite, their sum is not
    ],
    ids=["float32-max", "mixed-huge", "sum-overflows"],
)
def test_float32_overflowing_norms_are_exact_and_not_called_non_finite_with_max_abs(grad):
    record = _measure(grad, tf.float32, "huge")
    assert record.state == "ok" and record.nonfinite_steps == 0
    assert math.isclose(record.norm, _exact_norm(grad), rel_tol=1e-6)
    assert record.max_abs == float(np.max(np.abs(grad)))


def test_float32_underflowing_norms_are_not_reported_as_zero_with_max_abs():
    grad = np.full(4, 1e-30, np.float32)  # normal float32 values whose squares (1e-60) underflow
    record = _measure(grad, tf.float32, "tiny")
    assert record.state == "ok" and record.max_abs > 0
    assert math.isclose(record.norm, _exact_norm(grad), rel_tol=1e-6)  # no absolute tolerance: 0.0 is wrong


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_gradients_are_measured_in_float32(dtype):
    big = 60000.0 if dtype == tf.float16 else 3e38  # near each type's max: the squares overflow it
    grad = np.array([big, -big, 1.0, 0.0], np.float32)
    record = _measure(grad, dtype, f"half-{dtype.name}")
    exact = tf.cast(tf.cast(grad, dtype), tf.float64).numpy()  # the values as the half type holds them
    assert record.state == "ok"
    assert math.isclose(record.norm, _exact_norm(exact), rel_tol=1e-6)
    assert record.max_abs == pytest.approx(float(np.max(np.abs(exact))))

    inf = _measure(np.array([np.inf, 1.0], np.float32), dtype, f"half-inf-{dtype.name}")
    assert inf.state == "nonfinite" and inf.nonfinite_steps == 1


@pytest.mark.parametrize(
    "grad, state",
    [
        (np.array([2e19, 2e19, 2e19], np.float32), "nonfinite"),  # the float32 sum of squares overflows
        (np.full(4, 1e-30, np.float32), "zero"),  # every square underflows float32
        (np.array([1e19, -1.0], np.float32), "ok"),  # the largest norm float32 squares still hold
        (np.full(4, 1e-18, np.float32), "ok"),
    ],
    ids=["overflow", "underflow", "big", "small"],
)
def test_default_statistics_classify_float32_edges_as_documented(grad, state):
    record = _measure(grad, tf.float32, f"default-{state}-{grad.size}", max_abs=False)
    assert record.state == state
    assert math.isnan(record.max_abs)
    if state == "ok":
        assert math.isclose(record.norm, _exact_norm(grad), rel_tol=1e-6)
