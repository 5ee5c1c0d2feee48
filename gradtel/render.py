"""Plain-text tables for people: ``gradtel demo``'s per-variable summary and ``gradtel check``'s diagnosis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradtel.records import VariableRecord
from gradtel.vocabulary import State


def _norm(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns with a rule under the first row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _optimizers_line(report: dict[str, Any]) -> str:
    """Every optimizer the script created, with its steps: one that never stepped shows as 0."""
    parts = [
        f"{o['name']} ({o['steps']} step{'s' if o['steps'] != 1 else ''}"
        f"{', raised: ' + o['raised'] if o.get('raised') else ''})"
        for o in report["optimizers"]
    ]
    return "optimizers: " + (", ".join(parts) if parts else "none instrumented")


def _listed(names: Sequence[str], shown: int) -> str:
    """The first ``shown`` names, then how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def run_summary(report: dict[str, Any], shown: int = 4) -> str:
    """``gradtel run``'s lines at exit: one when all is healthy; else the optimizers, then each finding with its
    variables and first location. Notes (intended, never faults) follow in either case."""
    causes = {v["name"]: v["cause"] for v in report["variables"]}
    findings = [f for f in report["findings"] if f["category"] != "expected_missing"]
    if findings:
        lines = [f"gradtel: {_optimizers_line(report)}"]
    else:
        lines = [f"gradtel: no unhealthy gradient in {len(report['variables'])} variables ({_optimizers_line(report)})"]
    for finding in findings:
        names = finding["variables"]
        where = next((c["location"] for n in names if (c := causes.get(n)) and c.get("location")), None)
        if finding["category"] == "nonfinite_origin":
            where = f"step {finding['step']} of {finding['optimizer']}"
        lines.append(f"gradtel: {finding['category']}: {_listed(names, shown)}" + (f" (at {where})" if where else ""))
    for note in report.get("notes", ()):
        lines.append(f"gradtel: note, {note['category']} (no fault if intended): {_listed(note['variables'], shown)}")
    if findings:
        lines.append("gradtel: the fixes are in the report (gradtel run --report FILE) and docs/runbooks.md")
    return "\n".join(lines)


def report_table(report: dict[str, Any]) -> str:
    """``gradtel check``'s diagnosis: variable, status, cause, location; then the fix for each unhealthy one."""
    rows = [("optimizer", "variable", "status", "cause", "location")]
    fixes = []
    for v in report["variables"]:
        cause = v["cause"] or {}
        status = v["status"] + (" (expected)" if v["expected"] else "")
        rows.append((v["optimizer"], v["name"], status, cause.get("category") or "", cause.get("location") or ""))
        if v["status"] != "ok" and not v["expected"] and cause:
            fixes.append(f"- {v['name']}: {cause['explanation']}")
    lines = [_optimizers_line(report), "", *_columns(rows)]
    if fixes:
        lines += ["", "How to fix:", *fixes]
    for finding in report["findings"]:
        if finding["category"] == "untracked_variable":
            lines += ["", f"Untracked, never trained: {', '.join(finding['variables'])}. {finding['explanation']}"]
    for note in report.get("notes", ()):
        lines += ["", f"Note, not optimized: {', '.join(note['variables'])}. {note['explanation']}"]
    return "\n".join(lines)


def variables_table(records: Sequence[VariableRecord]) -> str:
    """One row per variable: optimizer, variable, status, latest norm, steps missing/zero/non-finite, cause."""
    header = ("optimizer", "variable", "status", "norm", "steps", "missing", "zero", "nonfinite", "cause")
    rows = [header]
    for r in records:
        cause = r.cause.category if r.cause is not None else ""
        if cause and r.cause is not None and r.cause.location:
            cause += f" ({r.cause.location})"
        rows.append(
            (
                r.optimizer,
                r.name,
                r.state,
                _norm(r.norm),
                str(r.steps),
                str(r.missing_steps),
                str(r.zero_steps),
                str(r.nonfinite_steps),
                cause,
            )
        )
    return "\n".join(_columns(rows))


def state_counts(records: Sequence[VariableRecord]) -> str:
    """``ok=4 missing=2`` for the states present."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    return " ".join(f"{state}={n}" for state, n in sorted(counts.items()))


#: Eight heights of a sparkline cell; a point with no finite value is a blank.
_BARS = "▁▂▃▄▅▆▇█"
#: States from worst to best: the order of the worst-variables table.
_SEVERITY = {State.NONFINITE: 0, State.ZERO: 1, State.MISSING: 2, State.REPLICA_DISAGREEMENT: 3, State.OK: 4}


def sparkline(values: Sequence[float | None], width: int = 60) -> tuple[str, bool]:
    """``values`` squeezed into at most ``width`` cells (the max of the points each cell covers, so a spike is
    never averaged away), log-scaled when they span more than two decades. Returns the line and whether it is
    log-scaled."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return " " * min(width, len(values)), False
    log_scale = min(finite) > 0 and max(finite) / min(finite) > 100
    cells: list[float | None] = []
    n = len(values)
    columns = min(width, n)
    for c in range(columns):
        chunk = [v for v in values[c * n // columns : (c + 1) * n // columns] if v is not None and math.isfinite(v)]
        cells.append(max(chunk) if chunk else None)
    scale = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    low, high = scale(min(finite)), scale(max(finite))
    span = high - low or 1.0
    return "".join(" " if v is None else _BARS[min(7, int((scale(v) - low) / span * 7.999))] for v in cells), log_scale


def worst_variables(report: dict[str, Any], shown: int) -> list[dict[str, Any]]:
    """Unhealthy variables first (non-finite, zero, missing), the earliest bad step first among them."""

    def first_bad(v: dict[str, Any]) -> int:
        steps = [v.get(f"first_{s}_step") for s in ("nonfinite", "zero", "missing")]
        return min((s for s in steps if s), default=1 << 62)

    unhealthy = [v for v in report["variables"] if v["status"] != "ok" or v.get("first_nonfinite_step")]
    unhealthy.sort(key=lambda v: (_SEVERITY.get(v["status"], 3), first_bad(v), v["name"]))
    return unhealthy[:shown]


def _step_text(value: int | None) -> str:
    return "-" if value is None else str(value)


def report_summary(report: dict[str, Any], width: int = 60, shown: int = 10) -> str:
    """``gradtel report FILE``: the optimizers with a sparkline of the global norm and of the unhealthy variables,
    the findings (a NaN's origin first), and the worst variables with their first bad steps."""
    lines = [
        f"gradtel report: run {report.get('run_id') or '-'}, generated {report.get('generated_at', '-')}",
        _optimizers_line(report),
        "",
    ]
    for optimizer in report["optimizers"]:
        history = (optimizer.get("history") or {}).get("global")
        if not history or not history["last_step"]:
            lines.append(f"{optimizer['name']}: no history (no step measured)")
            continue
        line, log_scale = sparkline(history["global_norm_max"], width)
        norms = [v for v in history["global_norm_max"] if v is not None]
        lines.append(
            f"{optimizer['name']}: steps {history['first_step'][0]}-{history['last_step'][-1]}, "
            f"{len(history['last_step'])} points of {history['steps_per_point']} step(s)"
        )
        lines.append(
            f"  global norm {line}  max {max(norms, default=float('nan')):.4g}"
            f"{', log scale' if log_scale else ''}, last {norm_text(optimizer.get('last_global_norm'))}"
        )
        for state in ("nonfinite", "zero", "missing"):
            counts = history[state]
            if any(counts):
                lines.append(
                    f"  {state:<11} {sparkline([float(c) for c in counts], width)[0]}  up to "
                    f"{max(counts)} variable(s) at once"
                )
    findings = sorted(report["findings"], key=lambda f: f["category"] != "nonfinite_origin")
    if findings:
        lines += ["", "findings:"]
    for finding in findings:
        if finding["category"] == "nonfinite_origin":
            lines.append(
                f"  NaN/Inf began at step {finding['step']} of {finding['optimizer']} in "
                f"{_listed(finding['variables'], 4)}; {finding['followed']} other variable(s) followed. "
                f"Resume from a checkpoint before step {finding['resume_before_step']}."
            )
        else:
            lines.append(f"  {finding['category']}: {_listed(finding['variables'], 4)}")
    worst = worst_variables(report, shown)
    if worst:
        rows = [("variable", "status", "first nonfinite", "first zero", "first missing", "recovered", "last norm")]
        for v in worst:
            recovered = max((v.get(f"recovered_{s}_step") or 0 for s in ("nonfinite", "zero", "missing")), default=0)
            rows.append(
                (
                    v["name"],
                    v["status"],
                    _step_text(v.get("first_nonfinite_step")),
                    _step_text(v.get("first_zero_step")),
                    _step_text(v.get("first_missing_step")),
                    _step_text(recovered or None),
                    norm_text(v.get("last_norm")),
                )
            )
        lines += ["", "worst variables:", *("  " + line for line in _columns(rows))]
    else:
        lines += ["", f"every one of the {len(report['variables'])} variables is healthy"]
    return "\n".join(lines)


def norm_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
