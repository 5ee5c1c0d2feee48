"""The tf_keras (Keras 2) callback: ``model.fit(..., callbacks=[gradtel.tf_keras.GradientTelemetry()])``."""

from __future__ import annotations

import tf_keras

from gradtel.callback import IdleOptimizerWarning, TelemetryMixin

__all__ = ["GradientTelemetry", "IdleOptimizerWarning"]


class GradientTelemetry(TelemetryMixin, tf_keras.callbacks.Callback):
    """Instrument the optimizers the model steps when ``fit`` starts: ``model.optimizer`` and those a custom
    ``train_step`` holds as attributes (arguments: those of ``gradtel.instrument``)."""

    # The current and the legacy (OptimizerV2) base classes; their loss-scale wrappers are subclasses of them.
    optimizer_types = (tf_keras.optimizers.Optimizer, tf_keras.optimizers.legacy.Optimizer)
