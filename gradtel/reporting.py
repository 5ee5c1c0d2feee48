"""The JSON report (``"schema": "gradtel.report/v1"``): every variable's gradient health and its cause.

Documented field by field in docs/report.md. ``gradtel.report()`` returns it as a dict; ``write`` puts it on disk
atomically (a temporary file in the same directory, fsynced, then renamed), so a reader never sees half a file.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from typing import Any

from gradtel import registry, statistics
from gradtel.config import Config
from gradtel.naming import unique_names
from gradtel.records import VariableRecord, nonfinite_origins
from gradtel.statistics import Report
from gradtel.vocabulary import Finding, MissingCause, State, ZeroCause, fix_for

SCHEMA = "gradtel.report/v1"


def _number(value: float) -> float | None:
    """JSON has no NaN/Inf: a missing or non-finite value is null."""
    return value if math.isfinite(value) else None


def _status(record: VariableRecord) -> str:
    return _MISSING if record.state == _EXPECTED_MISSING else record.state


def _cause(record: VariableRecord) -> dict[str, Any] | None:
    if record.cause is not None:
        return record.cause.to_dict()
    if record.state == _ZERO:
        return {"category": str(ZeroCause.OTHER), "op": None, "location": None, "explanation": ZeroCause.OTHER.fix}
    return None


#: States in which a variable had no gradient at its latest step (so no norm to report).
_NO_GRADIENT = (State.MISSING, State.EXPECTED_MISSING)
#: Bound once: a member's lookup on its enum costs about 75 ns, and the report reads every variable's record.
_OK, _MISSING, _ZERO, _EXPECTED_MISSING = State.OK, State.MISSING, State.ZERO, State.EXPECTED_MISSING
_FATAL = (State.NONFINITE, State.REPLICA_DISAGREEMENT)


#: The report's statistic fields (gradtel/statistics.py): what was measured, then (after the cause) when.
_VALUES = tuple(
    (s.field, s.key, s.report) for s in statistics.STATISTICS if s.report not in (Report.STEP, Report.OMITTED)
)
_STEPS = tuple((s.field, s.key) for s in statistics.STATISTICS if s.report is Report.STEP)


def _variable(record: VariableRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": record.name,
        "optimizer": record.optimizer,
        "layer": record.layer,
        "status": str(_status(record)),
        "expected": record.expected_missing,
    }
    no_gradient = record.state in _NO_GRADIENT
    for name, key, how in _VALUES:
        value = getattr(record, name)
        if how is Report.GRADIENT_VALUE:
            value = None if no_gradient else _number(value)
        out[key] = value
    out["cause"] = _cause(record)
    for name, key in _STEPS:
        out[key] = getattr(record, name) or None  # a first-bad or recovery step: null when it never happened (0)
    return out


#: Explanations of the finding categories that are not causes.
_FINDING_TEXT: dict[str, str] = {
    Finding.NONFINITE: "These gradients held NaN or Inf at the latest step: lower the learning rate, clip gradients, "
    "check the loss for log(0) or division by zero.",
    Finding.EXPECTED_MISSING: "Declared with expect_missing: intended to get no gradient.",
    Finding.REPLICA_DISAGREEMENT: "These variables get a gradient on some replicas and None on others, so the replicas "
    "disagree on what trains: make the forward pass the same on every replica (no branch "
    "on the replica id or on per-replica data shapes).",
    Finding.UNTRACKED_VARIABLE: "These plain tf.Variables are read in the training step and influence the loss, but "
    "Keras 3 does not track them (a tf.Variable set on a Keras 3 layer, kept in a Python "
    "list or held by a tf.Module on the layer is not a Keras variable), so they are not in "
    "model.trainable_variables and never train: create them with self.add_weight(...) or "
    "keras.Variable(...).",
    Finding.NOT_OPTIMIZED: "These trainable variables influence the loss but the program gave them to no optimizer, as "
    "a frozen feature extractor or a target network updated by assign is meant to be. If they "
    "should train, pass them to an optimizer; if not, trainable=False says so.",
}


def _origin_findings(records: list[VariableRecord]) -> list[dict[str, Any]]:
    findings = []
    for optimizer, (step, origin) in nonfinite_origins(records).items():
        names = {r.name for r in origin}
        later = [
            r.first_nonfinite_step
            for r in records
            if r.optimizer == optimizer and r.first_nonfinite_step and r.name not in names
        ]
        layers = sorted({r.layer for r in origin})
        where = ", ".join(f"'{layer}'" for layer in layers if layer) or "the top level"
        spread = (
            f" {len(later)} other variable{'s' if len(later) != 1 else ''} followed from step {min(later)} on "
            "(the NaN spreading through the updated values)."
            if later
            else ""
        )
        findings.append(
            {
                "category": str(Finding.NONFINITE_ORIGIN),
                "optimizer": optimizer,
                "step": step,
                "variables": sorted(names),
                "layers": layers,
                "followed": len(later),
                "resume_before_step": step,
                "explanation": (
                    f"The first non-finite gradient (NaN/Inf, or a norm past float32's ~1.8e19) of optimizer "
                    f"'{optimizer}' was at its step {step}, in "
                    f"{', '.join(sorted(names))} (layer {where}).{spread} Check the ops of that layer and what "
                    "feeds it at that step: log or sqrt of a value <= 0, a division by ~0, exp or pow overflowing, a "
                    "custom loss term, an input batch holding NaN; and the learning rate (an exploding norm in the "
                    "history just "
                    f"before step {step} points there). Resume from a checkpoint saved before step {step}."
                ),
            }
        )
    return findings


def _finding_category(record: VariableRecord) -> str | None:
    """The finding a variable belongs to: an ``--expect-missing`` match is expected whatever is wrong with it."""
    if record.state == _OK:
        return None
    if record.expected_missing:
        return Finding.EXPECTED_MISSING
    if record.state in _FATAL:
        return Finding(record.state)
    cause = _cause(record)
    return cause["category"] if cause else MissingCause.UNKNOWN


def _grouped(groups: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [
        {"category": str(c), "variables": names, "explanation": _FINDING_TEXT.get(c) or fix_for(c)}
        for c, names in groups.items()
    ]


def _findings_and_notes(
    records: list[VariableRecord], not_optimized: list[tuple[str, bool]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Findings: what is wrong (unhealthy variables grouped by cause, untracked variables) and what was declared
    expected. Notes: what is worth knowing but intended (tracked variables no optimizer received)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for record in records:
        category = _finding_category(record)
        if category is not None:
            groups[category].append(record.name)
    notes: dict[str, list[str]] = defaultdict(list)
    patterns = [h.expect_missing for h in registry.handles()]
    # A variable no optimizer got may share its path with one that did (keras.models.clone_model keeps the layer
    # names): it is named apart (``#2``), as duplicates among the variables are. Patterns match the path.
    shown = unique_names([path for path, _ in not_optimized], {r.name: 2 for r in records})
    for (path, tracked), name in zip(not_optimized, shown, strict=True):
        if any(p.matches(path) for p in patterns):
            groups[Finding.EXPECTED_MISSING].append(name)
        elif tracked:
            notes[Finding.NOT_OPTIMIZED].append(name)
        else:
            groups[Finding.UNTRACKED_VARIABLE].append(name)
    return _grouped(groups) + _origin_findings(records), _grouped(notes)


def _not_optimized() -> list[tuple[str, bool]]:
    diagnoser = registry.current_diagnoser()
    if diagnoser is None:
        return []
    optimized = [v for h in registry.handles() for v in h.variables()]
    return diagnoser.not_optimized(optimized)


def build() -> dict[str, Any]:
    """The report of every optimizer this process instrumented (one read of each table)."""
    from gradtel import export

    exporter = export.current()
    # Without an exporter, the same derivation the exporter's Config makes: the report and the metrics agree.
    run_id = exporter.config.run_id if exporter is not None else Config.from_env().run_id
    optimizers, records = [], []
    for handle in registry.handles():
        summary, handle_records = handle.read()
        entry = {
            "name": handle.name,
            "steps": summary.steps,
            "skipped_steps": summary.skipped_steps,
            "last_global_norm": _number(summary.global_norm),
        }
        if summary.raised:
            entry["raised"] = summary.raised
        history = handle.history()
        if history is not None:
            entry["history"] = history
        optimizers.append(entry)
        records.extend(handle_records)
    findings, notes = _findings_and_notes(records, _not_optimized())
    return {
        "schema": SCHEMA,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "optimizers": optimizers,
        "variables": [_variable(r) for r in records],
        "findings": findings,
        "notes": notes,
    }


#: A JSON array of scalars spread over lines by ``indent`` (numbers, null, booleans, plain words such as states).
_SCALAR = r'(?:-?\d[\d.eE+-]*|null|true|false|"[\w.-]*")'
_SCALAR_ARRAY = re.compile(rf"\[\n\s*{_SCALAR}(?:,\n\s*{_SCALAR})*\n\s*\]")


def dumps(report: dict[str, Any]) -> str:
    """The report's text: indented for people, but each array of scalars (the history's series) on one line, so
    512-point series keep the file a few times smaller."""
    text = json.dumps(report, indent=2)
    return (
        _SCALAR_ARRAY.sub(lambda m: "[" + ", ".join(part.strip() for part in m.group(0)[1:-1].split(",")) + "]", text)
        + "\n"
    )


def load(path: str) -> dict[str, Any]:
    """A report read back from ``path``; a ValueError in one line when it is not a ``gradtel.report/v1`` file."""
    with open(path, encoding="utf-8") as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not JSON ({error}); expected a gradtel.report/v1 file (gradtel run --report FILE)"
            ) from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        found = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ValueError(f"{path} is not a gradtel report: expected schema {SCHEMA!r}, found {found!r}")
    return report


def write(path: str, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` atomically: readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gradtel-report-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(report))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
