"""gradtel: per-variable gradient health for TensorFlow/Keras training, exported through OpenTelemetry.

import gradtel
handle = gradtel.instrument(optimizer)   # before the first step is traced
...train...
gradtel.uninstrument(optimizer)          # restores the optimizer exactly
"""

import importlib
from typing import Any

from gradtel.handle import Handle
from gradtel.instrumenting import instrument, is_instrumented, uninstrument
from gradtel.phases import phase
from gradtel.records import VariableRecord
from gradtel.version import __version__

#: Submodules reachable as attributes after ``import gradtel``, imported on first use: ``gradtel.keras`` imports
#: Keras (and TensorFlow), which ``import gradtel`` must not do (a script sets KERAS_BACKEND or
#: TF_USE_LEGACY_KERAS first, and the CLI starts fast).
_LAZY = ("keras", "tf_keras")

__all__ = [
    "Handle",
    "VariableRecord",
    "__version__",
    "instrument",
    "is_instrumented",
    "phase",
    "report",
    "uninstrument",
]


def report() -> dict:
    """The ``gradtel.report/v1`` report of every optimizer instrumented in this process (see docs/report.md)."""
    from gradtel import reporting

    return reporting.build()


def __getattr__(name: str) -> Any:
    """``gradtel.keras`` and ``gradtel.tf_keras`` without importing them first."""
    if name in _LAZY:
        return importlib.import_module(f"gradtel.{name}")
    raise AttributeError(f"module 'gradtel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
