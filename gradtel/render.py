"""Plain-text tables for people: ``gradtel demo``'s per-variable summary and ``gradtel check``'s diagnosis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradtel.handle import VariableRecord


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
    parts = [f"{o['name']} ({o['steps']} step{'s' if o['steps'] != 1 else ''}"
             f"{', raised: ' + o['raised'] if o.get('raised') else ''})" for o in report["optimizers"]]
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
        rows.append((r.optimizer, r.name, r.state, _norm(r.norm), str(r.steps), str(r.missing_steps),
                     str(r.zero_steps), str(r.nonfinite_steps), cause))
    return "\n".join(_columns(rows))


def state_counts(records: Sequence[VariableRecord]) -> str:
    """``ok=4 missing=2`` for the states present."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    return " ".join(f"{state}={n}" for state, n in sorted(counts.items()))
