"""The process's start time and phase reach a real scrape; the Keras callbacks set the phase from their hooks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tf_keras

import gradtel
from gradtel import export, identity, metrics, phases
from gradtel.config import Config
from gradtel.keras import GradientTelemetry
from gradtel.tf_keras import GradientTelemetry as LegacyTelemetry
from tests.core.helpers import free_port
from tests.core.test_export import sample, scrape


@pytest.fixture(autouse=True)
def no_phase():
    """Each test starts with no declared phase (the phase is per process) and leaves none behind."""
    phases._current = None
    yield
    phases._current = None


def test_start_time_is_served_and_the_phase_only_once_declared():
    export.shutdown()
    # Collections at every scrape (not spaced by CPU cost), so each scrape shows the phase of now.
    started = export.ensure_started(
        Config(prometheus_port=free_port(), run_id="phases", prometheus_min_interval_s=0, prometheus_cpu_share=1)
    )
    try:
        port = started.endpoint[1]
        before = scrape(port)
        assert sample(before["gradtel_process_start_time_seconds"], run="phases") == identity.START_TIME_S
        assert "gradtel_phase" not in before  # a custom loop that declares nothing counts as training
        with gradtel.phase("checkpoint"):
            during = {s.labels["phase"]: s.value for s in scrape(port)["gradtel_phase"]}
        assert during == {name: float(name == "checkpoint") for name in metrics.PHASES}
        after = {s.labels["phase"]: s.value for s in scrape(port)["gradtel_phase"]}
        assert after["train"] == 1 and after["checkpoint"] == 0
    finally:
        export.shutdown()


def test_an_unknown_phase_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^gradtel phase must be one of train, evaluate, predict, epoch_end"):
        gradtel.phase("lunch").__enter__()
    assert phases.current() is None


@pytest.mark.parametrize(
    "lib, telemetry", [(keras, GradientTelemetry), (tf_keras, LegacyTelemetry)], ids=["keras", "tf_keras"]
)
def test_fit_declares_evaluation_and_epoch_end_whatever_the_callback_order(lib, telemetry):
    """A probe placed before gradtel's callback sees ``epoch_end`` in its own on_epoch_end (the checkpointing slot),
    ``evaluate`` during validation, ``train`` during batches, and ``idle`` once fit returned."""
    seen: dict[str, set[str]] = {}

    class Probe(lib.callbacks.Callback):
        def _record(self, hook: str) -> None:
            seen.setdefault(hook, set()).add(phases.current())

        def on_train_batch_begin(self, batch, logs=None):
            self._record("train batch")

        def on_test_batch_begin(self, batch, logs=None):
            self._record("validation batch")

        def on_epoch_end(self, epoch, logs=None):
            self._record("epoch end")

    model = lib.Sequential([lib.Input((3,)), lib.layers.Dense(1, name="out")])
    model.compile(optimizer=lib.optimizers.SGD(0.01), loss="mse")
    x, y = np.ones((16, 3), "float32"), np.ones((16, 1), "float32")
    callback = telemetry(start_exporter=False)
    model.fit(x, y, batch_size=4, epochs=2, validation_data=(x, y), verbose=0, callbacks=[Probe(), callback])
    assert seen == {"train batch": {"train"}, "validation batch": {"evaluate"}, "epoch end": {"epoch_end"}}
    assert phases.current() == "idle"
    model.evaluate(x, y, verbose=0, callbacks=[Probe(), callback])
    assert seen["validation batch"] == {"evaluate"} and phases.current() == "idle"
    gradtel.uninstrument(model.optimizer)
