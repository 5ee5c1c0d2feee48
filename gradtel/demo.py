"""``gradtel demo``: a small Keras model with one deliberately disconnected head, trained under gradtel.

The model has two outputs but the loss is only given for ``main_head``, a common real bug (an output without a
loss): ``aux_head``'s variables never get a gradient and never train, while the loss curve looks fine.
``--nan-at STEP`` also makes the ``calibration`` variable's gradient NaN from that step on, to show the
non-finite path (and its alert) end to end.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

#: Keras prints per-batch progress itself; gradtel prints a line at most this often.
PROGRESS_INTERVAL_S = 1.0


class StopRequest:
    """SIGINT and SIGTERM ask the training loop to stop after the current step instead of raising in it.

    A KeyboardInterrupt lands at an arbitrary bytecode of the main thread: inside TensorFlow's or Keras's own
    Python code it can be swallowed or leave a lock held, and a demo that ignores Ctrl-C (or a pod's SIGTERM)
    is worse than one that stops a step late. The first signal sets a flag that the Keras callback turns into
    ``model.stop_training``; a second one restores the previous handlers and re-delivers itself (Ctrl-C twice
    aborts at once).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the signals for the duration (main thread only: elsewhere Python cannot, and nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            self.restore()


def build_model(nan_at: int | None) -> Any:
    import keras
    import tensorflow as tf

    class Calibration(keras.layers.Layer):
        """Adds ``0 * c`` to the output; its gradient is injected: tiny, or NaN from ``nan_at`` on."""

        def build(self, input_shape: Any) -> None:
            self.c = self.add_weight(shape=(), initializer="zeros", name="c")
            self.step = self.add_weight(shape=(), initializer="zeros", name="step", trainable=False)

        def call(self, x: Any) -> Any:
            step = self.step

            @tf.custom_gradient
            def scale(c: Any) -> Any:
                def grad(upstream: Any) -> Any:
                    value = 1e-3 * tf.reduce_sum(upstream)
                    if nan_at is None:
                        return value
                    return tf.where(step >= float(nan_at), tf.constant(np.nan, value.dtype), value)

                return tf.zeros_like(c), grad

            self.step.assign_add(1.0)
            return x + scale(self.c)

    inputs = keras.Input((8,), name="features")
    hidden = keras.layers.Dense(32, activation="relu", name="encoder")(inputs)
    main = keras.layers.Dense(1, name="main_head")(hidden)
    main = Calibration(name="calibration")(main)
    outputs = {"main_head": main, "aux_head": keras.layers.Dense(1, name="aux_head")(hidden)}
    return keras.Model(inputs, outputs, name="demo")


def run(steps: int, batch_size: int = 32, nan_at: int | None = None, out: TextIO = sys.stdout) -> int:
    """Train for ``steps`` optimizer steps (0: until interrupted), printing progress and the final table."""
    import keras
    import tensorflow as tf

    from gradtel import render
    from gradtel.keras import GradientTelemetry

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(1024, 1))).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, {"main_head": y})).repeat().batch(batch_size)

    model = build_model(nan_at)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"main_head": "mse"})
    telemetry = GradientTelemetry(max_abs=True)  # a tiny model: every dashboard panel gets data, max |g| too

    stop = StopRequest()

    class Progress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.last = 0.0

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if stop.received is not None:
                self.model.stop_training = True
            now = time.monotonic()
            if now - self.last < PROGRESS_INTERVAL_S or telemetry.handle is None:
                return
            self.last = now
            steps_done, global_norm = telemetry.handle.totals()
            loss = (logs or {}).get("loss", float("nan"))
            print(
                f"step {steps_done:>6}  loss {float(loss):.4f}  global norm {global_norm:.4g}  "
                f"variables: {render.state_counts(telemetry.handle.records())}",
                file=out,
                flush=True,
            )

    per_epoch = min(steps, 100) if steps > 0 else 100
    epochs = max(1, steps // per_epoch) if steps > 0 else 10**9
    with stop.installed():
        model.fit(
            data, epochs=epochs, steps_per_epoch=per_epoch, verbose=0, shuffle=False, callbacks=[telemetry, Progress()]
        )
    if stop.received is not None:
        print(f"stopped by {signal.Signals(stop.received).name}", file=out)
    if telemetry.handle is not None:
        print("\n" + render.variables_table(telemetry.handle.records()), file=out, flush=True)
    return 0
