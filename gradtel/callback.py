"""What the Keras callbacks of :mod:`gradtel.keras` and :mod:`gradtel.tf_keras` share.

A callback cannot see gradients (it only gets ``logs``); it instruments ``model.optimizer`` when training begins
and forces ``fit`` to trace its step again, because a step traced before the patch would never call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gradtel.handle import Handle
from gradtel.instrumenting import instrument, is_instrumented


class TelemetryMixin:
    """``on_train_begin``: instrument the model's optimizer (once) and re-make the train function."""

    model: Any

    def __init__(
        self,
        *,
        name: str | None = None,
        expect_missing: Iterable[str] | str | None = None,
        max_abs: bool | None = None,
        start_exporter: bool = True,
    ) -> None:
        """The arguments are those of :func:`gradtel.instrument`."""
        super().__init__()
        self._options = {"name": name, "expect_missing": expect_missing, "max_abs": max_abs,
                         "start_exporter": start_exporter}
        self.handle: Handle | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError("GradientTelemetry needs a compiled model: call model.compile(optimizer=...) first")
        if is_instrumented(optimizer):
            self.handle = instrument(optimizer)  # the existing handle
            return
        self.handle = instrument(optimizer, **self._options)
        self.model.make_train_function(force=True)
