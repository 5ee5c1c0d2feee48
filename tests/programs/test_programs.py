"""Real public programs (adapted keras-io examples and reproductions of public bug reports) under the real CLI.

Each program in this directory states what gradtel must find in a module-level ``EXPECT`` dict (read here with
``ast.literal_eval``, never imported) and marks the line a cause must point at with a ``# CULPRIT`` comment, so
this test stays generic: every program runs through ``gradtel run --report`` and ``gradtel check --json`` as a
user would run it, and both reports are judged against the program's own header.

``EXPECT`` keys: ``check_exit`` (0 healthy, 1 unhealthy), ``run_exit`` (the script's own exit status),
``optimizers`` (how many optimizers the whole run creates), ``stepping`` (how many of them take steps),
``raising`` (how many raise "No gradients provided", default 0), ``missing`` (variable path suffix -> cause
category, located at the ``# CULPRIT`` line), ``zero`` (path suffix -> cause category of an all-zero gradient that
no line explains) and ``untracked`` (path suffixes of ``untracked_variable`` findings).
"""

from __future__ import annotations

import ast
import io
import json
import pathlib
import subprocess
import sys
import tokenize
from typing import Any

import pytest

from tests.core.test_cli import BIN, ENV

pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).parent
PROGRAMS = sorted(p for p in HERE.glob("*.py") if not p.name.startswith(("test_", "conftest", "__")))
#: Generous: a program takes a few seconds; two run at once on a loaded 2-core machine.
TIMEOUT_S = 240


def expectations(program: pathlib.Path) -> dict[str, Any]:
    """The program's ``EXPECT = {...}``, parsed without running the program."""
    for node in ast.parse(program.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["EXPECT"]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{program.name} has no EXPECT dict")


def culprit_line(program: pathlib.Path) -> int:
    """The line carrying the ``# CULPRIT`` comment (a real comment token, not text in the docstring)."""
    tokens = tokenize.generate_tokens(io.StringIO(program.read_text()).readline)
    lines = [t.start[0] for t in tokens if t.type == tokenize.COMMENT and t.string.strip() == "# CULPRIT"]
    assert len(lines) == 1, f"{program.name}: expected one # CULPRIT comment, found lines {lines}"
    return lines[0]


def launch(program: pathlib.Path, *args: str) -> subprocess.Popen:
    env = {**ENV, "OTEL_METRICS_EXPORTER": "none", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [str(BIN / "gradtel"), *args, "--", sys.executable, str(program)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=program.parent,
    )


def judge_optimizers(report: dict[str, Any], expect: dict[str, Any], whole_run: bool) -> None:
    """``gradtel run`` sees every optimizer the program creates; ``check`` may end the program before the later
    ones exist, so there only the ones it saw are judged. A step that raised never ran: it is marked ``raised`` and
    not counted in ``steps`` (docs/report.md)."""
    optimizers = report["optimizers"]
    raising = [o for o in optimizers if "raised" in o]
    stepping = [o for o in optimizers if o["steps"] > 0 and "raised" not in o]
    assert all(o["steps"] == 0 for o in raising), optimizers
    assert len(raising) == expect.get("raising", 0), optimizers
    if whole_run:
        assert len(optimizers) == expect["optimizers"], optimizers
        assert len(stepping) == expect["stepping"], optimizers
    else:
        assert 0 < len(optimizers) <= expect["optimizers"], optimizers
        assert len(stepping) <= expect["stepping"], optimizers
        assert stepping or raising, optimizers


def judge_variables(report: dict[str, Any], expect: dict[str, Any], program: pathlib.Path) -> None:
    """Each expected variable is unhealthy with the expected cause (a missing one at the ``# CULPRIT`` line); no
    other finding."""
    variables = report["variables"]
    for suffix, category in expect.get("missing", {}).items():
        found = [v for v in variables if v["name"].endswith(suffix)]
        assert len(found) == 1, (suffix, [v["name"] for v in variables])
        variable = found[0]
        assert variable["status"] in ("missing", "zero") and not variable["expected"], variable
        cause = variable["cause"] or {}
        assert cause.get("category") == category, (suffix, cause)
        assert (cause.get("location") or "").endswith(f"{program.name}:{culprit_line(program)}"), (suffix, cause)
    for suffix, category in expect.get("zero", {}).items():
        found = [v for v in variables if v["name"].endswith(suffix)]
        assert len(found) == 1, (suffix, [v["name"] for v in variables])
        assert found[0]["status"] == "zero" and (found[0]["cause"] or {}).get("category") == category, found[0]
    untracked = next((f["variables"] for f in report["findings"] if f["category"] == "untracked_variable"), [])
    for suffix in expect.get("untracked", []):
        assert [n for n in untracked if n.endswith(suffix)], (suffix, report["findings"])
    wanted = {*expect.get("missing", {}).values(), *expect.get("zero", {}).values()}
    wanted |= {"untracked_variable"} if expect.get("untracked") else set()
    assert {f["category"] for f in report["findings"]} == wanted, report["findings"]


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_program_under_run_and_check(program: pathlib.Path, tmp_path: pathlib.Path) -> None:
    expect = expectations(program)
    report_file = tmp_path / "report.json"
    run = launch(program, "run", "--report", str(report_file))
    check = launch(program, "check", "--json")
    check_out, check_err = check.communicate(timeout=TIMEOUT_S)
    _run_out, run_err = run.communicate(timeout=TIMEOUT_S)

    assert check.returncode == expect["check_exit"], (check_out[-3000:], check_err[-3000:])
    check_report = json.loads(check_out)
    judge_optimizers(check_report, expect, whole_run=False)
    judge_variables(check_report, expect, program)

    assert run.returncode == expect["run_exit"], run_err[-3000:]
    run_report = json.loads(report_file.read_text())
    judge_optimizers(run_report, expect, whole_run=True)
    judge_variables(run_report, expect, program)
