"""The Keras 3 callback: ``model.fit(..., callbacks=[gradtel.keras.GradientTelemetry()])``."""

from __future__ import annotations

import keras

from gradtel.callback import IdleOptimizerWarning, TelemetryMixin

__all__ = ["GradientTelemetry", "IdleOptimizerWarning"]


class GradientTelemetry(TelemetryMixin, keras.callbacks.Callback):
    """Instrument the optimizers the model steps when ``fit`` starts: ``model.optimizer`` and those a custom
    ``train_step`` holds as attributes (arguments: those of ``gradtel.instrument``)."""

    # LossScaleOptimizer is a subclass: a wrapper is found, and its inner optimizer is left to it.
    optimizer_types = (keras.optimizers.Optimizer,)
