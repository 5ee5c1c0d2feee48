"""The single table of gradtel's exported metrics.

The Prometheus names below are gradtel's public interface: the dashboards, the alert rules, the docs and
users' own queries depend on them. Everything that names a metric (the exporter, the dashboard generator,
the rule generator, the README check) reads it from here, so a rename happens in one place.

OpenTelemetry instrument names are the Prometheus names without the ``_total`` suffix that the Prometheus
exporter appends to counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gradtel.vocabulary import State


class Kind(str, Enum):
    """OpenTelemetry instrument kind (all observable: they read gradtel's snapshot at collection time)."""

    COUNTER = "counter"
    GAUGE = "gauge"


#: Labels carried by every gradtel series. ``run`` tells restarts and concurrent runs of one job apart;
#: ``worker`` is the TF_CONFIG task (``chief:0``, ``worker:3``; empty, so absent, outside a multi-worker job).
COMMON_LABELS: tuple[str, ...] = ("run", "worker", "optimizer")
#: Labels of process-level series (one per training process, whatever its optimizers).
PROCESS_LABELS: tuple[str, ...] = ("run", "worker")
#: Labels of per-variable series.
VARIABLE_LABELS: tuple[str, ...] = (*COMMON_LABELS, "variable", "layer")

#: Values of the ``state`` label of ``gradtel_variables`` (a variable's state at its latest step).
STATES: tuple[State, ...] = tuple(State)


@dataclass(frozen=True)
class Metric:
    """One exported metric: its Prometheus name, kind, labels and meaning."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    unit: str
    description: str

    @property
    def otel_name(self) -> str:
        """The OpenTelemetry instrument name (the exporter adds ``_total`` to counters)."""
        return self.name.removesuffix("_total") if self.kind is Kind.COUNTER else self.name


STEPS = Metric(
    "gradtel_steps_total",
    Kind.COUNTER,
    COMMON_LABELS,
    "",
    "Optimizer steps observed by gradtel.",
)
MISSING = Metric(
    "gradtel_gradient_missing_total",
    Kind.COUNTER,
    (*VARIABLE_LABELS, "cause", "expected"),
    "",
    "Steps whose gradient for the variable was None. 'cause' is the diagnosed root cause category; "
    "'expected' is \"true\" for variables declared with expect_missing.",
)
ZERO = Metric(
    "gradtel_gradient_zero_total",
    Kind.COUNTER,
    VARIABLE_LABELS,
    "",
    "Steps whose gradient for the variable was all zeros.",
)
NONFINITE = Metric(
    "gradtel_gradient_nonfinite_total",
    Kind.COUNTER,
    VARIABLE_LABELS,
    "",
    "Steps whose gradient for the variable held NaN or Inf.",
)
NORM = Metric(
    "gradtel_gradient_norm",
    Kind.GAUGE,
    VARIABLE_LABELS,
    "",
    "L2 norm of the variable's gradient at the latest step (absent while it is missing or non-finite).",
)
MAX_ABS = Metric(
    "gradtel_gradient_max_abs",
    Kind.GAUGE,
    VARIABLE_LABELS,
    "",
    "Largest absolute gradient element of the variable at the latest step (absent while missing or non-finite).",
)
GLOBAL_NORM = Metric(
    "gradtel_gradient_global_norm",
    Kind.GAUGE,
    COMMON_LABELS,
    "",
    "Global L2 norm over the finite gradients at the latest step (non-finite ones are counted apart).",
)
VARIABLES = Metric(
    "gradtel_variables",
    Kind.GAUGE,
    (*COMMON_LABELS, "state"),
    "",
    "Variables whose latest gradient was in each state: ok, missing, zero, nonfinite, expected_missing, "
    "replica_disagreement (a gradient on some replicas, None on others).",
)

NONFINITE_ORIGIN = Metric(
    "gradtel_nonfinite_origin_step",
    Kind.GAUGE,
    VARIABLE_LABELS,
    "",
    "The optimizer step at which the run's first non-finite gradient appeared, on the variable(s) where it "
    "began (the earliest first non-finite step of the optimizer); absent before any.",
)
SKIPPED = Metric(
    "gradtel_loss_scale_skipped_steps_total",
    Kind.COUNTER,
    COMMON_LABELS,
    "",
    "Steps a loss-scale optimizer skipped because a gradient overflowed (not counted as non-finite steps).",
)

#: Values of the ``phase`` label of ``gradtel_phase``: what the process does between optimizer steps, so that the
#: stall alert tells a pause (evaluation, checkpointing, outside ``fit``) from a hang.
PHASES: tuple[str, ...] = ("train", "evaluate", "predict", "epoch_end", "checkpoint", "idle")

PROCESS_START = Metric(
    "gradtel_process_start_time_seconds",
    Kind.GAUGE,
    PROCESS_LABELS,
    "",
    "Start time of the training process (Unix seconds): a new value is a restart of the run.",
)
PHASE = Metric(
    "gradtel_phase",
    Kind.GAUGE,
    (*PROCESS_LABELS, "phase"),
    "",
    "1 for the phase the process is in (train, evaluate, predict, epoch_end, checkpoint, idle), 0 for the "
    "others; exported once a Keras callback or gradtel.phase() has set one.",
)

#: Every metric gradtel exports, in documentation order.
ALL: tuple[Metric, ...] = (
    STEPS,
    MISSING,
    ZERO,
    NONFINITE,
    NORM,
    MAX_ABS,
    GLOBAL_NORM,
    VARIABLES,
    SKIPPED,
    PROCESS_START,
    PHASE,
    NONFINITE_ORIGIN,
)
