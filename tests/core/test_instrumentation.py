"""Instrumenting Keras 3 and tf_keras optimizers: custom loops, fit, XLA, checkpoints, the callback, bad input."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import gradtel
from gradtel.keras import GradientTelemetry
from tests.core.helpers import by_name, numpy_norm

X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
Y = X @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")


def two_head_model(lib=keras):
    """A functional model whose 'aux' head gets no loss: its variables get no gradient."""
    inputs = lib.Input((4,))
    hidden = lib.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    main = lib.layers.Dense(1, name="main")(hidden)
    aux = lib.layers.Dense(1, name="aux")(hidden)
    return lib.Model(inputs, [main, aux])


@pytest.mark.parametrize("jit", [False, True])
def test_keras3_fit_counts_every_step_and_names_the_disconnected_head(jit):
    model = two_head_model()
    model.compile(optimizer="adam", loss=["mse", None], jit_compile=jit)
    telemetry = GradientTelemetry(name=f"fit-jit{jit}", start_exporter=False)
    model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[telemetry])
    records = by_name(telemetry.handle)
    assert telemetry.handle.totals()[0] == 8  # 64/16 x 2 epochs, every step counted
    assert {n for n, r in records.items() if r.state == "missing"} == {"aux/kernel", "aux/bias"}
    assert records["aux/kernel"].missing_steps == 8
    assert records["hidden/kernel"].state == "ok" and records["hidden/kernel"].norm > 0


def test_callback_takes_effect_when_fit_was_traced_before():
    model = two_head_model()
    model.compile(optimizer="sgd", loss=["mse", None])
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0)  # traced without gradtel
    telemetry = GradientTelemetry(name="retraced", start_exporter=False)
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[telemetry])
    assert telemetry.handle.totals()[0] == 2


def test_keras3_custom_loop_norms_equal_tape_gradients():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(1, name="d2")])
    opt = keras.optimizers.Adam()
    handle = gradtel.instrument(opt, name="loop", start_exporter=False)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return grads

    for _ in range(3):
        grads = step(X, Y)
    records = by_name(handle)
    for var, grad in zip(model.trainable_variables, grads, strict=True):
        assert records[var.path].norm == pytest.approx(numpy_norm(grad), rel=1e-5)
    assert handle.totals()[0] == 3


def test_instrument_twice_is_a_noop_and_uninstrument_restores_the_class_method():
    opt = keras.optimizers.Adam()
    h1 = gradtel.instrument(opt, name="twice", start_exporter=False)
    h2 = gradtel.instrument(opt, name="other", start_exporter=False)
    assert h1 is h2 and "apply" in vars(opt)
    gradtel.uninstrument(opt)
    assert "apply" not in vars(opt)
    assert opt.apply.__func__ is type(opt).apply
    gradtel.uninstrument(opt)  # again: a no-op


def test_uninstrument_mid_training_stops_counting_but_keeps_the_counts():
    var = keras.Variable(np.ones(3, "float32"), name="u")
    opt = keras.optimizers.SGD(0.1)
    handle = gradtel.instrument(opt, name="mid", start_exporter=False)
    for _ in range(2):
        opt.apply_gradients([(tf.ones(3), var)])
    gradtel.uninstrument(opt)
    opt.apply_gradients([(tf.ones(3), var)])
    assert handle.totals()[0] == 2
    np.testing.assert_allclose(var.numpy(), np.full(3, 0.7), rtol=1e-6)


def test_unsupported_optimizer_is_a_type_error_naming_what_is_supported():
    with pytest.raises(TypeError, match=r"Keras 3 optimizer.*tf_keras"):
        gradtel.instrument(object())
    with pytest.raises(TypeError, match="expected a glob"):
        gradtel.instrument(keras.optimizers.SGD(), expect_missing=[3], start_exporter=False)


@pytest.mark.parametrize("traced", [False, True])
def test_tf_compat_v1_optimizer_minimize_and_apply_gradients(traced):
    """Programs ported from TF 1 keep tf.compat.v1.train optimizers: minimize() funnels through apply_gradients."""
    w = tf.Variable(tf.ones((4, 1)), name="v1_w")
    unused = tf.Variable(tf.ones((2,)), name="v1_unused")
    optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.01)
    handle = gradtel.instrument(optimizer, name=f"v1-{traced}", start_exporter=False)

    def step():
        optimizer.minimize(lambda: tf.reduce_mean(tf.square(X[:8] @ w - Y[:8])), var_list=[w, unused])

    step = tf.function(step) if traced else step
    expected = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(X[:8] @ w - Y[:8]))
        expected.append(numpy_norm(tape.gradient(loss, w)))
        step()
    records = by_name(handle)
    assert records["v1_w"].steps == 3 and records["v1_w"].norm == pytest.approx(expected[-1], rel=1e-5)
    assert records["v1_unused"].state == "missing" and records["v1_unused"].missing_steps == 3
    assert records["v1_unused"].cause.category == "unused"
    gradtel.uninstrument(optimizer)


def test_expected_missing_variables_are_reported_as_expected():
    model = two_head_model()
    model.compile(optimizer="adam", loss=["mse", None])
    telemetry = GradientTelemetry(name="expected", expect_missing=["aux/*"], start_exporter=False)
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[telemetry])
    states = {n: r.state for n, r in by_name(telemetry.handle).items()}
    assert states["aux/kernel"] == states["aux/bias"] == "expected_missing"


def test_gradtel_failure_never_reaches_the_training_step(caplog, monkeypatch):
    from gradtel import stats

    def broken(self, grads):
        raise RuntimeError("boom")

    monkeypatch.setattr(stats.StatsTable, "update", broken)
    var = keras.Variable(np.ones(2, "float32"), name="f")
    opt = keras.optimizers.SGD(1.0)
    gradtel.instrument(opt, name="failing", start_exporter=False)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        for _ in range(3):
            opt.apply_gradients([(tf.ones(2), var)])
    np.testing.assert_allclose(var.numpy(), [-2.0, -2.0])
    assert sum("failed for optimizer 'failing'" in r.message for r in caplog.records) == 1


# --- tf_keras (Keras 2) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", [tf_keras.optimizers.Adam, tf_keras.optimizers.legacy.Adam])
def test_tf_keras_fit_and_one_shot_zip(optimizer):
    model = two_head_model(tf_keras)
    model.compile(optimizer=optimizer(), loss=["mse", None])
    from gradtel.tf_keras import GradientTelemetry as LegacyTelemetry

    telemetry = LegacyTelemetry(name=f"tfk-{optimizer.__module__}", start_exporter=False)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[telemetry])
    records = by_name(telemetry.handle)
    assert telemetry.handle.totals()[0] == 4
    assert records["aux/kernel"].state == "missing" and records["aux/kernel"].missing_steps == 4
    assert records["hidden/kernel"].state == "ok"

    # A one-shot iterator in a custom loop: consumed once, applied, measured.
    var = tf.Variable(np.ones(3, "float32"), name="zipvar")
    opt = optimizer(learning_rate=0.5)
    handle = gradtel.instrument(opt, name=f"tfk-zip-{optimizer.__module__}", start_exporter=False)
    opt.apply_gradients(zip([tf.constant([3.0, 0.0, 4.0])], [var], strict=True))
    assert by_name(handle)["zipvar"].norm == pytest.approx(5.0)
    assert var.numpy()[1] == pytest.approx(1.0)


# --- checkpoints -----------------------------------------------------------------------------------------------
def train_steps(model, opt, steps=3):
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(X)[0] - Y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def snapshot(model, opt):
    return [v.numpy().copy() for v in model.weights] + [v.numpy().copy() for v in opt.variables]


@pytest.mark.parametrize("writer_instrumented", [True, False])
def test_tf_train_checkpoint_round_trips_both_directions(tmp_path, writer_instrumented):
    keras.utils.set_random_seed(1)
    model, opt = two_head_model(), keras.optimizers.Adam()
    if writer_instrumented:
        gradtel.instrument(opt, name="ckpt-writer", start_exporter=False)
    train_steps(model, opt)
    path = tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "ckpt"))
    written = snapshot(model, opt)

    keras.utils.set_random_seed(2)
    model2, opt2 = two_head_model(), keras.optimizers.Adam()
    if not writer_instrumented:
        gradtel.instrument(opt2, name="ckpt-reader", start_exporter=False)
    opt2.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=opt2).read(path).assert_consumed()
    for a, b in zip(written, snapshot(model2, opt2), strict=True):
        np.testing.assert_array_equal(a, b)
    train_steps(model2, opt2, 1)  # the restored, (un)instrumented optimizer trains on


@pytest.mark.parametrize("writer_instrumented", [True, False])
def test_keras_file_round_trips_both_directions(tmp_path, writer_instrumented):
    model = two_head_model()
    model.compile(optimizer="adam", loss=["mse", None])
    callbacks = [GradientTelemetry(name="kfile-writer", start_exporter=False)] if writer_instrumented else []
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    if not writer_instrumented:
        gradtel.instrument(loaded.optimizer, name="kfile-reader", start_exporter=False)
    for a, b in zip(snapshot(model, model.optimizer), snapshot(loaded, loaded.optimizer), strict=True):
        np.testing.assert_array_equal(a, b)
    loaded.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    assert loaded.optimizer.iterations.numpy() == 4
