"""Production training paths: MirroredStrategy, mixed precision, embeddings, XLA with steps_per_execution."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from gradtel.keras import GradientTelemetry
from tests.core.helpers import by_name, numpy_norm

X = np.random.default_rng(0).random((16, 4)).astype("float32")
Y = np.random.default_rng(1).random((16, 1)).astype("float32")


def two_heads(seed: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    return keras.Model(inputs, [keras.layers.Dense(1, name="main")(hidden), keras.layers.Dense(1, name="aux")(hidden)])


@pytest.fixture(scope="module")
def strategy():
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs two logical CPU devices (tests/production/conftest.py sets them up before TF starts)")
    return tf.distribute.MirroredStrategy([cpus[0].name, cpus[1].name])


def test_mirrored_fit_reports_the_all_reduced_gradients(strategy):
    plain = two_heads()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((plain(X)[0] - Y) ** 2)
    reference = dict(
        zip([v.path for v in plain.trainable_variables], tape.gradient(loss, plain.trainable_variables), strict=True)
    )
    with strategy.scope():
        model = two_heads()
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss=["mse", None])
    telemetry = GradientTelemetry(name="mirrored", start_exporter=False)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[telemetry])

    records = by_name(telemetry.handle)
    # Each replica saw 8 samples; the optimizer applies the sum, which is the full-batch gradient.
    for name in ("hidden/kernel", "hidden/bias", "main/kernel", "main/bias"):
        assert records[name].norm == pytest.approx(numpy_norm(reference[name]), rel=1e-5)
        assert records[name].steps == 1
    assert records["aux/kernel"].state == "missing" and records["aux/kernel"].missing_steps == 1


def test_replicas_that_disagree_on_a_missing_gradient_are_flagged(strategy):
    with strategy.scope():
        a = tf.Variable([1.0, 2.0], name="shared")
        b = tf.Variable([3.0], name="replica0_only")
    optimizer = keras.optimizers.SGD()
    handle = gradtel.instrument(optimizer, name="disagree", start_exporter=False)

    @tf.function
    def step():
        def replica_fn():
            replica = tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group)
            grads = [tf.ones(2), tf.ones(1) if replica == 0 else None]
            handle.observe(grads, [a, b])  # the funnel's own call, without an optimizer that would all-reduce

        strategy.run(replica_fn)

    step()
    assert handle._tables  # traced per replica
    table = next(iter(handle._tables.values()))
    assert table.disagreement == {1}
    gradtel.uninstrument(optimizer)


def test_a_disagreement_that_fails_keras_update_is_still_reported(strategy):
    """tensorflow/tensorflow#27716: a branch on the replica id. Keras 3's distributed update fails (the replicas'
    gradient lists differ) before any statistics ran; the report still names the variables, as a step that raised."""
    with strategy.scope():
        a = tf.Variable([1.0, 2.0], name="kept")
        b = tf.Variable([3.0], name="replica0_only")
    optimizer = keras.optimizers.SGD()
    gradtel.instrument(optimizer, name="disagree_fails", start_exporter=False)

    @tf.function
    def step():
        def replica_fn():
            replica = tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group)
            optimizer.apply_gradients(zip([tf.ones(2), tf.ones(1) if replica == 0 else None], [a, b], strict=True))

        strategy.run(replica_fn)

    try:
        with pytest.raises(Exception) as raised:
            step()
        assert not isinstance(raised.value, ValueError) or "No gradients" not in str(raised.value)  # Keras's own
        report = gradtel.report()
    finally:
        gradtel.uninstrument(optimizer)
    (entry,) = [o for o in report["optimizers"] if o["name"] == "disagree_fails"]
    assert entry["steps"] == 0 and entry["raised"]
    states = {v["name"]: v["status"] for v in report["variables"] if v["optimizer"] == "disagree_fails"}
    assert states == {"kept": "missing", "replica0_only": "replica_disagreement"}


def test_loss_scale_optimizer_reports_unscaled_norms_and_counts_skipped_steps_apart():
    var = keras.Variable(np.ones(3, "float32"), name="w")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=1024.0)
    handle = gradtel.instrument(optimizer, name="lso", start_exporter=False)
    unscaled = tf.constant([3.0, 0.0, 4.0])
    optimizer.apply_gradients([(unscaled * 1024.0, var)])  # LSO receives scaled gradients
    record = by_name(handle)["w"]
    assert record.norm == pytest.approx(5.0) and record.state == "ok"

    before = var.numpy().copy()
    optimizer.apply_gradients([(tf.constant([np.inf, 1.0, 1.0]), var)])  # an overflow: the step is skipped
    np.testing.assert_array_equal(var.numpy(), before)
    summary = handle.summary()
    assert (summary.steps, summary.skipped_steps) == (2, 1)
    record = by_name(handle)["w"]
    assert record.state == "nonfinite" and record.nonfinite_steps == 0
    gradtel.uninstrument(optimizer)


def test_mixed_precision_fit_measures_every_step_unscaled():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d"), keras.layers.Dense(1, name="o")])
        model.compile(optimizer="sgd", loss="mse")  # compile wraps the optimizer in a LossScaleOptimizer
        telemetry = GradientTelemetry(name="mixed", start_exporter=False)
        model.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[telemetry])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    records = by_name(telemetry.handle)
    assert telemetry.handle.totals()[0] == 4
    # Unscaled: a float32 gradient of this tiny model is O(1), the scaled one O(3e4).
    assert 0 < records[model.get_layer("o").kernel.path].norm < 100


def test_embedding_gradients_count_touched_rows_and_norms_exactly_in_fit():
    ids = np.array([[1, 1, 7], [7, 7, 2]], "int32")  # rows 1, 2, 7 touched; repeated ids sum
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(50, 4, name="emb"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    telemetry = GradientTelemetry(name="embedding", start_exporter=False)
    model.fit(ids, np.ones((2, 1), "float32"), batch_size=2, epochs=1, verbose=0, callbacks=[telemetry])
    (table,) = model.get_layer("emb").trainable_variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.mean_squared_error(np.ones((2, 1), "float32"), model(ids)))
    (grad,) = tape.gradient(loss, [table])
    assert isinstance(grad, tf.IndexedSlices)
    record = by_name(telemetry.handle)[table.path]
    assert record.rows_touched == 3
    assert record.norm == pytest.approx(numpy_norm(tf.convert_to_tensor(grad)), rel=1e-5)


def test_xla_with_steps_per_execution_counts_every_step():
    model = two_heads()
    model.compile(optimizer="adam", loss=["mse", None], jit_compile=True, steps_per_execution=4)
    telemetry = GradientTelemetry(name="xla-spe", start_exporter=False)
    model.fit(X, Y, batch_size=2, epochs=1, verbose=0, callbacks=[telemetry])  # 8 steps in 2 executions
    assert telemetry.handle.totals()[0] == 8
    assert by_name(telemetry.handle)["aux/kernel"].missing_steps == 8


def test_a_gans_two_optimizers_are_labelled_apart_in_the_report():
    keras.utils.set_random_seed(5)
    generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, name="gen")])
    discriminator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="disc")])
    g_opt, d_opt = keras.optimizers.Adam(), keras.optimizers.Adam()
    gradtel.instrument(g_opt, name="generator", start_exporter=False)
    gradtel.instrument(d_opt, name="discriminator", start_exporter=False)

    @tf.function
    def step(noise, real):
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(noise)
            d_loss = tf.reduce_mean(discriminator(fake)) - tf.reduce_mean(discriminator(real))
            g_loss = -tf.reduce_mean(discriminator(fake))
        d_vars, g_vars = discriminator.trainable_variables, generator.trainable_variables
        d_opt.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars, strict=True))
        g_opt.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars, strict=True))

    for _ in range(3):
        step(tf.random.normal((8, 2)), tf.random.normal((8, 4)))
    report = gradtel.report()
    gan = ("generator", "discriminator")
    steps = {o["name"]: o["steps"] for o in report["optimizers"] if o["name"] in gan}
    assert steps == {"generator": 3, "discriminator": 3}
    mine = [v for v in report["variables"] if v["optimizer"] in gan]  # other tests' optimizers share the process
    owners = {v["name"]: v["optimizer"] for v in mine}
    assert {owners[v.path] for v in generator.trainable_variables} == {"generator"}
    assert {owners[v.path] for v in discriminator.trainable_variables} == {"discriminator"}
    ours = {v.path for v in (*generator.trainable_variables, *discriminator.trainable_variables)}
    status = {v["name"]: v["status"] for v in mine if v["name"] in ours}  # an earlier test's "generator" too
    # The critic's loss mean(D(fake)) - mean(D(real)) cancels its bias exactly: d/db = 1 - 1 = 0, every step.
    bias = discriminator.get_layer("disc").bias.path
    assert status.pop(bias) == "zero"
    assert set(status.values()) == {"ok"}
    gradtel.uninstrument(g_opt)
    gradtel.uninstrument(d_opt)
