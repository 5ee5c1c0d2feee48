"""E2E harness tests: the shipped rules, Prometheus config and Alertmanager config, run for real.

A fake gradtel endpoint (prometheus_client, real metric names) stands in for a training job; the real-run
test that replaces it with ``gradtel demo`` builds on these fixtures.
"""

from __future__ import annotations

import pytest

from gradtel.localstack import StackConfig
from tests.observability.harness import FakeGradtel, WebhookReceiver, dashboard_queries, query, substitute, wait_for

pytestmark = pytest.mark.slow
#: Grafana's values of the template variables: "All" (.+) for every filter.
_TEMPLATE_VALUES = {
    "__rate_interval": "1m",
    "datasource": "prometheus",
    "job": ".+",
    "instance": ".+",
    "run": ".+",
    "worker": ".*",
    "optimizer": ".+",
    "layer": ".+",
    "variable": ".+",
}


def test_harness_disconnected_and_nonfinite_alerts_reach_the_receiver(
    stack: StackConfig, webhook: WebhookReceiver, fake_gradtel: FakeGradtel
) -> None:
    disconnected = wait_for(
        lambda: webhook.alerts("GradtelVariableDisconnected"), 60, "GradtelVariableDisconnected at the webhook receiver"
    )
    assert {alert["labels"]["variable"] for alert in disconnected} == {"head/kernel"}, (
        "only the unexpected missing variable alerts; aux/kernel is declared with expect_missing"
    )
    labels = disconnected[0]["labels"]
    assert labels["run"] == "harness" and labels["job"] == "gradtel" and labels["cause"] == "unused"
    assert disconnected[0]["annotations"]["runbook_url"].endswith("#gradtelvariabledisconnected")

    nonfinite = wait_for(
        lambda: webhook.alerts("GradtelGradientNonFinite"), 60, "GradtelGradientNonFinite at the webhook receiver"
    )
    assert nonfinite[0]["labels"]["severity"] == "critical"
    assert nonfinite[0]["labels"]["variable"] == "dense/kernel"


def test_harness_healthy_targets_raise_no_target_down(stack: StackConfig, webhook: WebhookReceiver) -> None:
    wait_for(lambda: webhook.alerts("GradtelVariableDisconnected"), 60, "the first notification")
    firing = query(stack.prometheus_url, 'ALERTS{alertname=~"GradtelTargetDown|GradtelStepsStalled"}')
    assert firing["status"] == "success" and firing["data"]["result"] == []


def test_harness_every_dashboard_query_evaluates(stack: StackConfig, webhook: WebhookReceiver) -> None:
    """Every panel and variable query parses and runs on real Prometheus against gradtel-shaped data."""
    wait_for(lambda: webhook.alerts("GradtelVariableDisconnected"), 60, "data to be scraped")
    failures = []
    for panel in dashboard_queries():
        answer = query(stack.prometheus_url, substitute(panel.expr, _TEMPLATE_VALUES))
        if answer["status"] != "success":
            failures.append(f"{panel.where}: {answer.get('error')}")
    assert not failures, "\n".join(failures)
