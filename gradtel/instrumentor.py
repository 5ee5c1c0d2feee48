"""``opentelemetry-instrument python train.py`` turns gradtel on, through the ``opentelemetry_instrumentor``
entry point, like the instrumentations of opentelemetry-python-contrib."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from gradtel import auto

#: The keyword arguments of ``instrument()`` handed on to :func:`gradtel.instrument` for every optimizer.
_OPTIONS = ("expect_missing", "max_abs", "meter_provider", "start_exporter")


class GradtelInstrumentor(BaseInstrumentor):
    """Instruments every Keras 3 and tf_keras optimizer the program creates.

    ``instrument(expect_missing=[...], max_abs=..., meter_provider=..., start_exporter=...)`` takes the options of
    :func:`gradtel.instrument`. The MeterProvider is ``meter_provider`` when given (nothing is started), else the
    global one ``opentelemetry-instrument`` configured, else gradtel's own from the environment.
    ``uninstrument()`` undoes every patch: the optimizer classes', the optimizers', the diagnoser's.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        # Keras 3 or tf_keras: either is enough, so no single hard requirement is declared.
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        auto.enable(**options)

    def _uninstrument(self, **kwargs: Any) -> None:
        auto.disable()
