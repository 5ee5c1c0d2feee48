"""``opentelemetry-instrument python train.py`` turns gradtel on, through the ``opentelemetry_instrumentor``
entry point, like the instrumentations of opentelemetry-python-contrib."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from gradtel import auto


class GradtelInstrumentor(BaseInstrumentor):
    """Instruments every Keras 3 and tf_keras optimizer the program creates.

    ``instrument(expect_missing=[...])`` takes the options of :func:`gradtel.instrument`; the MeterProvider is the
    one ``opentelemetry-instrument`` configured (or gradtel's own, from the environment).
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        # Keras 3 or tf_keras: either is enough, so no single hard requirement is declared.
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        options = {k: v for k, v in kwargs.items() if k in ("expect_missing", "start_exporter")}
        auto.enable(**options)

    def _uninstrument(self, **kwargs: Any) -> None:
        auto.disable()
