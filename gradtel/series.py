"""Cardinality control: which per-variable series a process exports.

Every variable is measured and counted in ``gradtel_variables`` and the report; this module only decides which
of them get series of their own, so that a 10,000-variable model or a 64-worker job keeps Prometheus healthy:

- ``variable``: one set of series per variable;
- ``layer``: one set per layer (``variable="<layer>/*"``): counters summed, norm = sqrt(sum of squares),
  max |g| = max;
- ``topk``: the K variables with the largest norms, plus every variable that is not ``ok``;
- ``auto`` (default): ``variable`` up to the series budget (2,000 variables), beyond it ``layer`` plus every
  variable that is not ``ok``;
- ``none``: no per-variable series.

Include/exclude patterns narrow the variables first. Under MultiWorkerMirroredStrategy the all-reduced gradients
are the same on every worker, so by default only the chief exports per-variable series; the other workers
export their optimizer-level summary.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gradtel import statistics
from gradtel.naming import PatternSet
from gradtel.records import HEAD_FIELDS, VariableRecord
from gradtel.vocabulary import State

#: Bound once: a member's lookup on its enum costs about 75 ns, and the selection reads every variable's record.
_OK = State.OK

MODES = ("auto", "variable", "layer", "topk", "none")
#: Variables with series of their own in ``auto`` mode: 3 to 5 series each, so at most about 10,000 series per
#: optimizer and run, well inside what one Prometheus handles per target.
DEFAULT_BUDGET = 2000
DEFAULT_TOP_K = 100


@dataclass(frozen=True)
class SeriesPolicy:
    """What to export per variable (see the module docstring); built from the environment by config.py."""

    mode: str = "auto"
    budget: int = DEFAULT_BUDGET
    top_k: int = DEFAULT_TOP_K
    include: PatternSet = field(default_factory=lambda: PatternSet(None))
    exclude: PatternSet = field(default_factory=lambda: PatternSet(None))
    exporting_worker: bool = True  # False on a non-chief worker when only the chief exports per variable

    def select(self, records: Sequence[VariableRecord]) -> Selection:
        """The records to export as series: real variables and, in roll-up modes, records per layer."""
        if not self.exporting_worker or self.mode == "none":
            return Selection([], [])
        chosen = [
            r
            for r in records
            if (not self.include or self.include.matches(r.name)) and not self.exclude.matches(r.name)
        ]
        mode = self.mode
        if mode == "auto":
            mode = "variable" if len(chosen) <= self.budget else "layer"
        if mode == "variable":
            return Selection(chosen, chosen)
        unhealthy = [r for r in chosen if r.state != _OK]
        if mode == "topk":
            finite = sorted(
                (r for r in chosen if r.state == _OK and math.isfinite(r.norm)), key=lambda r: r.norm, reverse=True
            )
            picked = finite[: self.top_k] + unhealthy
            return Selection(picked, picked)
        by_layer, by_cause = _layer_roll_ups(chosen)
        return Selection(by_layer + unhealthy, by_cause + unhealthy)


@dataclass(frozen=True)
class Selection:
    """``records`` feed the per-variable gauges and counters; ``missing`` feeds the missing counter, whose
    ``cause`` label splits a layer roll-up by cause."""

    records: list[VariableRecord]
    missing: list[VariableRecord]


def _root_sum_squares(values: Sequence[float], norms: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return math.sqrt(sum(v * v for v in finite)) if finite else math.nan


def _max_where_finite_norm(values: Sequence[float], norms: Sequence[float]) -> float:
    largest = -math.inf
    for value, norm in zip(values, norms, strict=True):
        if math.isfinite(norm) and value > largest:  # False for NaN (max |g| not measured)
            largest = value
    return largest if largest >= 0.0 else math.nan


_FIELD_AT = {name: i for i, name in enumerate(VariableRecord._fields)}
_NORM_AT, _EXPECTED_AT, _STATE_AT = _FIELD_AT["norm"], _FIELD_AT["expected_missing"], _FIELD_AT["state"]


def _fields_rolled_by(rule: statistics.RollUp) -> tuple[int, ...]:
    return tuple(_FIELD_AT[s.field] for s in statistics.STATISTICS if s.roll_up is rule)


#: The record fields of the statistics, by roll-up rule (gradtel/statistics.py); the others keep their default.
_SUMMED, _MAXED = _fields_rolled_by(statistics.RollUp.SUM), _fields_rolled_by(statistics.RollUp.MAX)
_BY_NORMS: tuple[tuple[int, Callable[[Sequence[float], Sequence[float]], float]], ...] = (
    *((at, _root_sum_squares) for at in _fields_rolled_by(statistics.RollUp.ROOT_SUM_SQUARES)),
    *((at, _max_where_finite_norm) for at in _fields_rolled_by(statistics.RollUp.MAX_WHERE_FINITE_NORM)),
)
_DEFAULTS = [VariableRecord._field_defaults.get(name) for name in VariableRecord._fields]


def _roll_up(layer: str, members: Sequence[VariableRecord]) -> VariableRecord:
    """One record standing for ``members``, each statistic by its roll-up rule (gradtel/statistics.py): counts
    summed, norm = sqrt(sum of squares), max |g| = max.

    This runs per layer per collection (thousands of times for a large model): the members are transposed once
    into one tuple per field, and the record is laid out in field order."""
    first = members[0]
    columns = list(zip(*members, strict=True))
    values = list(_DEFAULTS)
    for at in _SUMMED:
        values[at] = sum(columns[at])
    for at in _MAXED:
        values[at] = max(columns[at])
    norms = columns[_NORM_AT]
    for at, rule in _BY_NORMS:
        values[at] = rule(columns[at], norms)
    values[: len(HEAD_FIELDS)] = (  # optimizer, name, layer, expected_missing, cause, missing_cause
        first.optimizer,
        f"{layer}/*" if layer else "*",
        first.layer,
        all(columns[_EXPECTED_AT]),
        None,
        first.missing_cause,
    )
    values[_STATE_AT] = _OK if columns[_STATE_AT].count(_OK) == len(members) else "mixed"
    return tuple.__new__(VariableRecord, values)


def _layer_roll_ups(records: Iterable[VariableRecord]) -> tuple[list[VariableRecord], list[VariableRecord]]:
    """One record per layer (the gauges and counters) and one per layer and missing cause (the missing counter,
    whose ``cause`` label must stay exact). A layer whose variables share one cause, nearly all of them, is
    merged once and serves both."""
    groups: dict[tuple[str, str], dict[str, list[VariableRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(r.optimizer, r.layer)][r.missing_cause.category if r.missing_cause is not None else ""].append(r)
    by_layer, by_cause = [], []
    for (_, layer), causes in groups.items():
        merged = [_roll_up(layer, members) for members in causes.values()]
        by_cause += merged
        by_layer.append(merged[0] if len(merged) == 1 else _roll_up(layer, [r for m in causes.values() for r in m]))
    return by_layer, by_cause
