"""One worker of a two-process MultiWorkerMirroredStrategy job (driven by test_multiworker.py).

``python mw_worker.py OUT_DIR STEPS``: TF_CONFIG, OTEL_EXPORTER_PROMETHEUS_PORT and GRADTEL_* come from the
environment. The worker trains a two-head Keras 3 model (``aux`` has no loss, so its variables never get a
gradient) for STEPS custom-loop steps, each worker on its half of one fixed global batch, with the optimizer
instrumented by gradtel. Worker 0 also computes, without any strategy, the full-batch gradients at the weights
of the last step (the reference for the all-reduced norms). It then writes ``OUT_DIR/done-<index>.json`` and
serves its metrics until ``OUT_DIR/release`` appears (or a deadline passes), and leaves with ``os._exit`` so no
collective teardown can hang it.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 16
SEED = 3
LEARNING_RATE = 0.1
LINGER_S = 90.0


def data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).random((GLOBAL_BATCH, 4)).astype("float32")
    y = np.random.default_rng(1).random((GLOBAL_BATCH, 1)).astype("float32")
    return x, y


def two_heads():
    import keras

    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    return keras.Model(inputs, [keras.layers.Dense(1, name="main")(hidden), keras.layers.Dense(1, name="aux")(hidden)])


def main() -> None:
    out, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    index, n_workers = int(task["index"]), len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"])
    # The strategy must exist before any other TensorFlow op (it configures the collective runtime).
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == n_workers, strategy.num_replicas_in_sync

    import keras

    import gradtel

    x, y = data()
    local = GLOBAL_BATCH // n_workers
    x_local, y_local = x[index * local : (index + 1) * local], y[index * local : (index + 1) * local]

    with strategy.scope():
        model = two_heads()
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
    handle = gradtel.instrument(optimizer, name="mw")

    @tf.function
    def step(xb, yb):
        def replica_fn(xb, yb):
            with tf.GradientTape() as tape:
                main_out, _ = model(xb)
                # Summed over the local examples and divided by the global batch: the all-reduced sum of the
                # replicas' gradients is the gradient of the full-batch mean loss.
                loss = tf.reduce_sum((main_out - yb) ** 2) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

        strategy.run(replica_fn, args=(xb, yb))

    last_weights = None
    for _ in range(steps):
        last_weights = [np.array(w) for w in model.get_weights()]
        step(tf.constant(x_local), tf.constant(y_local))
    report = {
        "index": index,
        "steps": steps,
        "handle_steps": handle.totals()[0],
        "weights_checksum": float(sum(np.abs(w).sum() for w in model.get_weights())),
    }

    if index == 0:
        # Independent reference: plain Keras model, no strategy, the whole global batch, the last step's weights.
        plain = two_heads()  # outside strategy.scope(): the default strategy
        plain.set_weights(last_weights)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((plain(x)[0] - y) ** 2)
        grads = tape.gradient(loss, plain.trainable_variables)
        report["reference"] = {
            v.path: (None if g is None else float(np.linalg.norm(np.asarray(g, np.float64).ravel())))
            for v, g in zip(plain.trainable_variables, grads, strict=True)
        }

    (out / f"done-{index}.json.tmp").write_text(json.dumps(report))
    (out / f"done-{index}.json.tmp").rename(out / f"done-{index}.json")
    deadline = time.monotonic() + LINGER_S
    while not (out / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
