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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from gradtel.handle import VariableRecord
from gradtel.naming import PatternSet

MODES = ("auto", "variable", "layer", "topk", "none")
#: Variables with series of their own in ``auto`` mode: about 5 series each, so about 10,000 series per
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
        chosen = [r for r in records if (not self.include or self.include.matches(r.name))
                  and not self.exclude.matches(r.name)]
        mode = self.mode
        if mode == "auto":
            mode = "variable" if len(chosen) <= self.budget else "layer"
        if mode == "variable":
            return Selection(chosen, chosen)
        unhealthy = [r for r in chosen if r.state != "ok"]
        if mode == "topk":
            finite = sorted((r for r in chosen if r.state == "ok" and math.isfinite(r.norm)),
                            key=lambda r: r.norm, reverse=True)
            picked = finite[: self.top_k] + unhealthy
            return Selection(picked, picked)
        return Selection(_layers(chosen) + unhealthy, _layers_by_cause(chosen) + unhealthy)


@dataclass(frozen=True)
class Selection:
    """``records`` feed the per-variable gauges and counters; ``missing`` feeds the missing counter, whose
    ``cause`` label splits a layer roll-up by cause."""

    records: list[VariableRecord]
    missing: list[VariableRecord]


def _merge(layer: str, members: Sequence[VariableRecord]) -> VariableRecord:
    """One record standing for ``members``: counts summed, norm = sqrt(sum of squares), max |g| = max."""
    finite = [r for r in members if math.isfinite(r.norm)]
    return replace(
        members[0],
        name=f"{layer}/*" if layer else "*",
        expected_missing=all(r.expected_missing for r in members),
        cause=None,
        steps=max(r.steps for r in members),
        missing_steps=sum(r.missing_steps for r in members),
        zero_steps=sum(r.zero_steps for r in members),
        nonfinite_steps=sum(r.nonfinite_steps for r in members),
        norm=math.sqrt(sum(r.norm**2 for r in finite)) if finite else math.nan,
        max_abs=max((r.max_abs for r in finite), default=math.nan),
        rows_touched=sum(r.rows_touched for r in members),
        state="ok" if all(r.state == "ok" for r in members) else "mixed",
    )


def _group(records: Iterable[VariableRecord], by_cause: bool) -> dict[tuple[str, ...], list[VariableRecord]]:
    groups: dict[tuple[str, ...], list[VariableRecord]] = defaultdict(list)
    for r in records:
        cause = (r.missing_cause.category if r.missing_cause is not None else "",) if by_cause else ()
        groups[(r.optimizer, r.layer, *cause)].append(r)
    return groups


def _layers(records: Iterable[VariableRecord]) -> list[VariableRecord]:
    return [_merge(key[1], members) for key, members in _group(records, by_cause=False).items()]


def _layers_by_cause(records: Iterable[VariableRecord]) -> list[VariableRecord]:
    """Per layer and missing cause, so the missing counter's cause label stays exact."""
    out = []
    for key, members in _group(records, by_cause=True).items():
        merged = _merge(key[1], members)
        out.append(replace(merged, missing_cause=members[0].missing_cause))
    return out
