"""The Prometheus rule file: valid (promtool check rules), unit-tested (promtool test rules), documented.

The promtool tests are the committed deploy/prometheus/tests/*.yml (generated from deploy/rule_tests.py; the
generated-files test fails on a stale one). Each scenario of a job's life also fails on the rules as they were
before issue 15 (kept in tests/observability/data/): a wrong firing state, not only different labels.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import alerts, rule_tests
from deploy.generate import RULE_TESTS_DIR
from gradtel import metrics, vocabulary
from tests.observability.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "gradtel-rules.yml"
#: The rule file before issue 15 (restarts, crash loops, pauses, sporadic NaNs, workers), for the regression proof.
RULES_BEFORE = Path(__file__).resolve().parent / "data" / "gradtel-rules-before-issue-15.yml"
SCENARIO_FILES = sorted(RULE_TESTS_DIR.glob("*.yml"))
_CHECKS = [(case, check) for cases in rule_tests.SCENARIOS.values() for case in cases for check in case.checks]
RUNBOOKS = ROOT / "docs" / "runbooks.md"
REQUIRED_ALERTS = {
    "GradtelVariableDisconnected",
    "GradtelGradientNonFinite",
    "GradtelGradientAllZero",
    "GradtelGradientNormExploding",
    "GradtelGradientNormVanishing",
    "GradtelStepsStalled",
    "GradtelTargetDown",
}


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_scenario_has_a_committed_test_file() -> None:
    assert {path.stem for path in SCENARIO_FILES} == set(rule_tests.SCENARIOS)


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=[path.stem for path in SCENARIO_FILES])
def test_promtool_unit_tests(path: Path) -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _state_failures(output: str) -> list[str]:
    """The failed promtool checks whose number of alerts differs from the expected one (fired when it had to
    stay quiet, stayed quiet when it had to fire, one alert per worker instead of one): label or annotation
    differences alone are not counted."""
    failures = []
    for block in re.split(r"\n(?=\s+alertname: )", output):
        if "exp:" in block and "got:" in block:
            expected, got = block.split("got:", 1)
            if expected.count("Labels:") != got.count("Labels:"):
                failures.append(block.strip().splitlines()[0])
    return failures


@pytest.mark.parametrize("name", [n for n in rule_tests.SCENARIOS if n != "alerts"])
def test_each_scenario_fails_on_the_rules_before_issue_15(name: str, tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    (tmp_path / "gradtel-rules.yml").write_text(RULES_BEFORE.read_text())
    (tmp_path / "tests").mkdir()
    test_file = tmp_path / "tests" / f"{name}.yml"
    test_file.write_text((RULE_TESTS_DIR / f"{name}.yml").read_text())
    result = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert result.returncode != 0 and _state_failures(result.stdout + result.stderr), result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    names = {alert.name for alert in alerts.alerts()}
    firing = {check.alert for _, check in _CHECKS if check.expected}
    quiet = {check.alert for _, check in _CHECKS if not check.expected}
    assert names <= firing, f"no firing case for {names - firing}"
    assert names <= quiet, f"no quiet case for {names - quiet}"


def test_the_required_alerts_exist_with_severity_and_annotations() -> None:
    rules = _alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["alert"].startswith("Gradtel")
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        assert rule["annotations"]["runbook_url"].endswith(f"runbooks.md#{rule['alert'].lower()}")


def test_disconnected_ignores_expected_missing_and_names_the_variable() -> None:
    rule = next(r for r in _alert_rules() if r["alert"] == "GradtelVariableDisconnected")
    assert 'expected!="true"' in rule["expr"]
    for label in ("variable", "layer", "run", "job", "cause"):
        assert f"$labels.{label}" in rule["annotations"]["description"]


def test_norm_alerts_compare_with_the_runs_own_baseline() -> None:
    for rule in _alert_rules():
        if rule["alert"].startswith("GradtelGradientNorm"):
            assert "offset" in rule["expr"] and "quantile_over_time" in rule["expr"]


def test_every_alert_has_a_runbook_section() -> None:
    text = RUNBOOKS.read_text()
    headings = set(re.findall(r"^## (\w+)$", text, flags=re.MULTILINE))
    assert {rule["alert"] for rule in _alert_rules()} <= headings


def test_runbooks_cover_every_cause_category() -> None:
    text = RUNBOOKS.read_text()
    missing = [name for name in vocabulary.ALL_CAUSES if f"`{name}`" not in text]
    assert not missing, f"docs/runbooks.md does not explain {missing}"


@pytest.mark.parametrize(
    "case", [c for cases in rule_tests.SCENARIOS.values() for c in cases], ids=lambda case: case.name
)
def test_cases_use_real_metric_names(case: rule_tests.Case) -> None:
    known = {m.name for m in metrics.ALL} | {"up"}
    for item in case.input_series:
        assert item["series"].split("{")[0] in known
