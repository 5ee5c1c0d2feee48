"""Plain-text tables for people: the per-variable summary printed by ``gradtel demo`` and ``gradtel check``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradtel.handle import VariableRecord


def _norm(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def variables_table(records: Sequence[VariableRecord]) -> str:
    """One row per variable: optimizer, variable, status, latest norm, steps missing/zero/non-finite, cause."""
    header = ("optimizer", "variable", "status", "norm", "steps", "missing", "zero", "nonfinite", "cause")
    rows = [header]
    for r in records:
        cause = r.cause.category if r.cause is not None else ""
        if cause and r.cause.location:
            cause += f" ({r.cause.location})"
        rows.append((r.optimizer, r.name, r.state, _norm(r.norm), str(r.steps), str(r.missing_steps),
                     str(r.zero_steps), str(r.nonfinite_steps), cause))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def state_counts(records: Sequence[VariableRecord]) -> str:
    """``ok=4 missing=2`` for the states present."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    return " ".join(f"{state}={n}" for state, n in sorted(counts.items()))
