"""gradtel: per-variable gradient health for TensorFlow/Keras training, exported through OpenTelemetry.

    import gradtel
    handle = gradtel.instrument(optimizer)   # before the first step is traced
    ...train...
    gradtel.uninstrument(optimizer)          # restores the optimizer exactly
"""

from gradtel.handle import Handle, VariableRecord
from gradtel.instrumenting import instrument, is_instrumented, uninstrument
from gradtel.phases import phase

__version__ = "0.1.0"

__all__ = ["Handle", "VariableRecord", "__version__", "instrument", "is_instrumented", "phase", "report",
           "uninstrument"]


def report() -> dict:
    """The ``gradtel.report/v1`` report of every optimizer instrumented in this process (see docs/report.md)."""
    from gradtel import reporting

    return reporting.build()
