"""tf_keras (legacy Keras 2) under MirroredStrategy with two logical CPU devices (driven by test_multiworker.py).

Run with TF_USE_LEGACY_KERAS=1 in a fresh process, so the logical devices are configured before TensorFlow
initialises. For the tf_keras optimizer and the tf_keras legacy optimizer: ``fit`` a two-head model (``aux`` has
no loss) with gradtel's tf_keras callback on one 16-example batch split over the two replicas, then compute the
full-batch gradients without any strategy, at the same weights (learning rate 0). Prints one JSON line.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import tf_keras  # noqa: E402

import gradtel  # noqa: E402
from gradtel.tf_keras import GradientTelemetry  # noqa: E402

X = np.random.default_rng(0).random((16, 4)).astype("float32")
Y = np.random.default_rng(1).random((16, 1)).astype("float32")
EPOCHS = 2


def two_heads() -> tf_keras.Model:
    tf_keras.utils.set_random_seed(3)
    inputs = tf_keras.Input((4,))
    hidden = tf_keras.layers.Dense(3, name="hidden")(inputs)
    return tf_keras.Model(
        inputs, [tf_keras.layers.Dense(1, name="main")(hidden), tf_keras.layers.Dense(1, name="aux")(hidden)]
    )


def norm(g) -> float:
    return float(np.linalg.norm(np.asarray(tf.convert_to_tensor(g), np.float64).ravel()))


def run(strategy: tf.distribute.Strategy, make_optimizer, name: str) -> dict:
    with strategy.scope():
        model = two_heads()
        model.compile(optimizer=make_optimizer(), loss=["mse", None])
    telemetry = GradientTelemetry(name=name, start_exporter=False)
    model.fit(X, Y, batch_size=16, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=[telemetry])

    plain = two_heads()  # no strategy: the whole batch on one device
    plain.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((plain(X)[0] - Y) ** 2)
    grads = tape.gradient(loss, plain.trainable_variables)
    reference = {
        v.name.split(":")[0]: (None if g is None else norm(g))
        for v, g in zip(plain.trainable_variables, grads, strict=True)
    }
    present = [g for g in grads if g is not None]
    steps, global_norm = telemetry.handle.totals()
    result = {
        "optimizer_class": type(model.optimizer).__module__ + "." + type(model.optimizer).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "steps": steps,
        "global_norm": global_norm,
        "reference_global_norm": float(tf.linalg.global_norm(present)),
        "reference": reference,
        "records": {
            r.name: {"state": r.state, "norm": r.norm, "steps": r.steps, "missing_steps": r.missing_steps}
            for r in telemetry.handle.records()
        },
    }
    gradtel.uninstrument(model.optimizer)
    return result


def main() -> None:
    cpus = tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([cpus[0].name, cpus[1].name])
    out = {
        "optimizer": run(strategy, lambda: tf_keras.optimizers.SGD(0.0), "tfk"),
        "legacy": run(strategy, lambda: tf_keras.optimizers.legacy.SGD(0.0), "tfk_legacy"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
