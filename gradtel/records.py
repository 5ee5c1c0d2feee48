"""Reading records: one table's snapshot decoded into typed, immutable ``VariableRecord``s.

Kept apart from the step (gradtel/recording.py) and from TensorFlow: the exporter's and the report's threads read
records, the step never does. A record is built by keyword, so a field added to it cannot shift the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from gradtel import layout
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


def decode(optimizer: str, snapshots: list[tuple[VariableTable, layout.Snapshot]]) -> list[VariableRecord]:
    """Every variable's record from one read of each table; a variable in several lists gets one merged record."""
    out: dict[str, VariableRecord] = {}
    for table, snap in snapshots:
        rows = snap.rows.tolist()  # once: indexing numpy per field costs more than building the record
        missing, zero, nonfinite = rows[layout.MISSING], rows[layout.ZERO], rows[layout.NONFINITE]
        seen, norm, max_abs = rows[layout.STEPS_SEEN], rows[layout.NORM], rows[layout.MAX_ABS]
        states, touched = rows[layout.STATE], rows[layout.ROWS_TOUCHED]
        first_missing, first_zero, first_nonfinite = rows[layout.FIRST_MISSING : layout.FIRST_NONFINITE + 1]
        back_missing, back_zero, back_nonfinite = rows[layout.RECOVERED_MISSING : layout.RECOVERED_NONFINITE + 1]
        for i, name in enumerate(table.names):
            if not seen[i] and table.raised is None:
                continue
            # A traced step that raised never ran its statistics: every variable of it is missing, as diagnosed.
            state = layout.STATE_NAMES.get(states[i], _OK) if seen[i] else _MISSING
            if i in table.disagreement:
                state = _REPLICA_DISAGREEMENT
            elif state == _MISSING and table.expected[i]:
                state = _EXPECTED_MISSING
            missing_cause = table.causes.get(i) if missing[i] or not seen[i] else None
            cause = missing_cause if state in _NO_GRADIENT else table.zero_hint(i) if state == _ZERO else None
            record = VariableRecord(
                optimizer=optimizer,
                name=name,
                layer=table.layers[i],
                expected_missing=table.expected[i],
                cause=cause,
                missing_cause=missing_cause,
                steps=int(seen[i]),
                missing_steps=int(missing[i]),
                zero_steps=int(zero[i]),
                nonfinite_steps=int(nonfinite[i]),
                norm=norm[i],
                max_abs=max_abs[i],
                rows_touched=int(touched[i]),
                state=state,
                first_missing_step=int(first_missing[i]),
                first_zero_step=int(first_zero[i]),
                first_nonfinite_step=int(first_nonfinite[i]),
                # a recovery from a state never counted as bad (a loss-scale optimizer's skipped step) is none
                recovered_missing_step=int(back_missing[i]) if first_missing[i] else 0,
                recovered_zero_step=int(back_zero[i]) if first_zero[i] else 0,
                recovered_nonfinite_step=int(back_nonfinite[i]) if first_nonfinite[i] else 0,
            )
            previous = out.get(name)
            out[name] = record if previous is None else merge(previous, record)
    return list(out.values())


def merge(older: VariableRecord, newer: VariableRecord) -> VariableRecord:
    """One variable seen through two variable lists: counts add up, the latest values come from ``newer``."""
    return newer._replace(
        steps=older.steps + newer.steps,
        missing_steps=older.missing_steps + newer.missing_steps,
        zero_steps=older.zero_steps + newer.zero_steps,
        nonfinite_steps=older.nonfinite_steps + newer.nonfinite_steps,
        missing_cause=newer.missing_cause or older.missing_cause,
        first_missing_step=older.first_missing_step or newer.first_missing_step,
        first_zero_step=older.first_zero_step or newer.first_zero_step,
        first_nonfinite_step=older.first_nonfinite_step or newer.first_nonfinite_step,
        recovered_missing_step=newer.recovered_missing_step or older.recovered_missing_step,
        recovered_zero_step=newer.recovered_zero_step or older.recovered_zero_step,
        recovered_nonfinite_step=newer.recovered_nonfinite_step or older.recovered_nonfinite_step,
    )


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
