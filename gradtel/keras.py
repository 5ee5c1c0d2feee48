"""The Keras 3 callback: ``model.fit(..., callbacks=[gradtel.keras.GradientTelemetry()])``."""

from __future__ import annotations

import keras

from gradtel.callback import TelemetryMixin


class GradientTelemetry(TelemetryMixin, keras.callbacks.Callback):
    """Instrument ``model.optimizer`` when ``fit`` starts (arguments: those of ``gradtel.instrument``)."""
