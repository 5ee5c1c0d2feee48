"""The tf_keras (Keras 2) callback: ``model.fit(..., callbacks=[gradtel.tf_keras.GradientTelemetry()])``."""

from __future__ import annotations

import tf_keras

from gradtel.callback import TelemetryMixin


class GradientTelemetry(TelemetryMixin, tf_keras.callbacks.Callback):
    """Instrument ``model.optimizer`` when ``fit`` starts (arguments: those of ``gradtel.instrument``)."""
