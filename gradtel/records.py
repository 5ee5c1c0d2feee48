"""Reading records: one table's snapshot decoded into typed, immutable ``VariableRecord``s.

Kept apart from the step (gradtel/recording.py) and from TensorFlow: the exporter's and the report's threads read
records, the step never does. A record is built by keyword, so a field added to it cannot shift the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gradtel import layout, statistics
from gradtel.vocabulary import State

if TYPE_CHECKING:
    from gradtel.diagnosis.cause import Cause
    from gradtel.tables import VariableTable

#: The states, bound once: looking a member up on its enum costs about 75 ns, and ``decode`` builds one record per
#: variable per collection.
_OK, _MISSING, _ZERO = State.OK, State.MISSING, State.ZERO
_EXPECTED_MISSING, _REPLICA_DISAGREEMENT = State.EXPECTED_MISSING, State.REPLICA_DISAGREEMENT
_NO_GRADIENT = (_MISSING, _EXPECTED_MISSING)


class VariableRecord(NamedTuple):
    """The latest statistics of one variable, as the exporter and the report see them (immutable).

    A named tuple, not a frozen dataclass: a collection of a 10,000-variable model builds 10,000 of these, and a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) made building them a third of it.
    The fields from ``steps`` on are the per-variable statistics, named and ordered as in gradtel/statistics.py.
    """

    optimizer: str
    name: str
    layer: str
    expected_missing: bool
    cause: Cause | None  # why the latest gradient is missing or zero, once diagnosed
    missing_cause: Cause | None  # the Cause of the variable's missing steps (labels the missing counter)
    steps: int
    missing_steps: int
    zero_steps: int
    nonfinite_steps: int
    norm: float
    max_abs: float
    rows_touched: int
    state: str  # a State; a layer roll-up of several states (series.py) is "mixed"
    #: The step (1-based, counted by gradtel for this variable list) at which the gradient was first missing /
    #: all-zero / non-finite, and the latest step at which it was healthy right after being so; 0: never.
    first_missing_step: int = 0
    first_zero_step: int = 0
    first_nonfinite_step: int = 0
    recovered_missing_step: int = 0
    recovered_zero_step: int = 0
    recovered_nonfinite_step: int = 0


@dataclass(frozen=True)
class OptimizerSummary:
    """Optimizer-level statistics: steps observed, latest global norm, loss-scale skipped steps."""

    steps: int
    global_norm: float
    skipped_steps: int
    raised: str | None = None  # Keras's error, when a step of this optimizer raised because every gradient was None


def summarize(snapshots: list[tuple[VariableTable, layout.Snapshot]]) -> OptimizerSummary:
    """The optimizer-level values across one optimizer's tables (the latest global norm of the last one stepped)."""
    steps, skipped, global_norm, raised = 0, 0, float("nan"), None
    for table, snap in snapshots:
        steps += snap.steps
        skipped += snap.skipped
        if snap.steps:
            global_norm = snap.global_norm
        raised = table.raised or raised
    return OptimizerSummary(steps=steps, global_norm=global_norm, skipped_steps=skipped, raised=raised)


#: The record's fields before the statistics, which follow in the order of gradtel/statistics.py.
HEAD_FIELDS = ("optimizer", "name", "layer", "expected_missing", "cause", "missing_cause")
if VariableRecord._fields != HEAD_FIELDS + tuple(s.field for s in statistics.STATISTICS):  # pragma: no cover
    raise TypeError("VariableRecord's fields must be its head then gradtel/statistics.py's fields, in table order")
#: Each statistic's row, whether it decodes as an int, and the row that must be set for it to count; the state is
#: decoded per variable, with facts the table lacks (replicas, expect_missing).
_COLUMNS = tuple(
    (layout.ROW[s.field], s.integer, layout.ROW[s.requires] if s.requires else None) for s in statistics.STATISTICS
)
_FIELDS = [s.field for s in statistics.STATISTICS]
_STEPS_AT, _MISSING_AT, _STATE_AT = _FIELDS.index("steps"), _FIELDS.index("missing_steps"), _FIELDS.index("state")
#: The statistics two records of one variable combine other than by taking the newer one's.
_MERGED = tuple((s.field, s.merge) for s in statistics.STATISTICS if s.merge is not statistics.Merge.NEWER)


def _statistics_by_variable(rows: np.ndarray) -> list[tuple[Any, ...]]:
    """Each variable's statistics as a tuple in table order (one conversion per row: per element would cost more
    than the record)."""
    columns = []
    for row, integer, requires in _COLUMNS:
        values = rows[row] if requires is None else np.where(rows[requires] != 0.0, rows[row], 0.0)
        columns.append((values.astype(np.int64) if integer else values).tolist())
    return list(zip(*columns, strict=True))


def decode(optimizer: str, snapshots: list[tuple[VariableTable, layout.Snapshot]]) -> list[VariableRecord]:
    """Every variable's record from one read of each table; a variable in several lists gets one merged record.

    The statistics are laid into the record in table order (checked against ``VariableRecord``'s fields at import):
    a collection of a 10,000-variable model builds 10,000 records, and keywords per statistic doubled its cost."""
    out: dict[str, VariableRecord] = {}
    new = tuple.__new__
    at = _STATE_AT
    for table, snap in snapshots:
        by_variable = _statistics_by_variable(snap.rows)
        zero_causes: dict[int, Cause | None] | None = None  # worked out at the first zero gradient (rare)
        for i, name in enumerate(table.names):
            values = by_variable[i]
            seen, state_value = values[_STEPS_AT], values[at]
            if not seen and table.raised is None:
                continue
            # A traced step that raised never ran its statistics: every variable of it is missing, as diagnosed.
            state = layout.STATE_NAMES.get(state_value, _OK) if seen else _MISSING
            if i in table.disagreement:
                state = _REPLICA_DISAGREEMENT
            elif state == _MISSING and table.expected[i]:
                state = _EXPECTED_MISSING
            missing_cause = table.causes.get(i) if values[_MISSING_AT] or not seen else None
            cause = missing_cause if state in _NO_GRADIENT else None
            if state == _ZERO:
                zero_causes = table.zero_causes(snap.rows[layout.STATE]) if zero_causes is None else zero_causes
                cause = zero_causes.get(i)
            head = (optimizer, name, table.layers[i], table.expected[i], cause, missing_cause)
            record = new(VariableRecord, head + values[:at] + (state,) + values[at + 1 :])
            previous = out.get(name)
            out[name] = record if previous is None else merge(previous, record)
    return list(out.values())


_MERGE_RULES: dict[statistics.Merge, Callable[[Any, Any], Any]] = {
    statistics.Merge.ADD: lambda older, newer: older + newer,
    statistics.Merge.OLDER_FIRST: lambda older, newer: older or newer,
    statistics.Merge.NEWER_FIRST: lambda older, newer: newer or older,
}


def merge(older: VariableRecord, newer: VariableRecord) -> VariableRecord:
    """One variable seen through two variable lists: counts add up, the latest values come from ``newer``."""
    changes = {name: _MERGE_RULES[rule](getattr(older, name), getattr(newer, name)) for name, rule in _MERGED}
    return newer._replace(missing_cause=newer.missing_cause or older.missing_cause, **changes)


def nonfinite_origins(records: list[VariableRecord]) -> dict[str, tuple[int, list[VariableRecord]]]:
    """Per optimizer, the earliest step at which a gradient went non-finite and the variables that did then.

    A NaN spreads: once one variable's NaN gradient is applied, its value is NaN and every gradient computed
    through it is NaN one step later. The variables whose first non-finite step is the earliest are where it began.
    """
    origins: dict[str, tuple[int, list[VariableRecord]]] = {}
    for record in records:
        step = record.first_nonfinite_step
        if not step:
            continue
        best = origins.get(record.optimizer)
        if best is None or step < best[0]:
            origins[record.optimizer] = (step, [record])
        elif step == best[0]:
            best[1].append(record)
    return origins
