"""The Prometheus rule file: valid (promtool check rules), unit-tested (promtool test rules), documented."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import alerts
from gradtel import causes, metrics
from tests.observability import rule_cases
from tests.observability.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "gradtel-rules.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
REQUIRED_ALERTS = {
    "GradtelVariableDisconnected", "GradtelGradientNonFinite", "GradtelGradientAllZero",
    "GradtelGradientNormExploding", "GradtelGradientNormVanishing", "GradtelStepsStalled",
    "GradtelTargetDown",
}


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    test_file = tmp_path / "gradtel-rules.test.yml"
    test_file.write_text(yaml.safe_dump(rule_cases.promtool_tests(str(RULES)), sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    names = {alert.name for alert in alerts.alerts()}
    firing = {case.alert for case in rule_cases.CASES if case.expected}
    quiet = {case.alert for case in rule_cases.CASES if not case.expected}
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
    for label in ("variable", "layer", "run", "job"):
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
    missing = [name for name in (*causes.MISSING_CAUSES, *causes.ZERO_CAUSES) if f"`{name}`" not in text]
    assert not missing, f"docs/runbooks.md does not explain {missing}"


@pytest.mark.parametrize("case", rule_cases.CASES, ids=[case.name for case in rule_cases.CASES])
def test_cases_use_real_metric_names(case: rule_cases.Case) -> None:
    known = {m.name for m in metrics.ALL} | {"up"}
    for item in case.input_series:
        assert item["series"].split("{")[0] in known
