"""E2E with real components: a real training job under gradtel, the shipped stack, the committed dashboards.

``gradtel demo`` trains a Keras model whose ``aux_head`` has no loss (its two variables get no gradient) and
whose ``calibration/c`` gradient turns NaN at step ``DEMO_NAN_AT``; Prometheus and Alertmanager run the
shipped configs with only the intervals shortened. The tests check that the two problems travel the whole
way (Prometheus rule -> Alertmanager -> webhook, naming the variable and the run), that nothing alerts for
the healthy variables, and that every dashboard panel shows data for this run.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from gradtel.localstack import StackConfig
from tests.observability.harness import (
    DemoProcess,
    WebhookReceiver,
    api_get,
    dashboard_queries,
    query,
    query_range,
    substitute,
    wait_for,
)

pytestmark = pytest.mark.slow

DISCONNECTED = "GradtelVariableDisconnected"
NONFINITE = "GradtelGradientNonFinite"
#: Every alert the run must raise, as (alertname, variable), and nothing else.
EXPECTED_ALERTS = {(DISCONNECTED, "aux_head/kernel"), (DISCONNECTED, "aux_head/bias"), (NONFINITE, "calibration/c")}
HEALTHY = {"encoder/kernel", "encoder/bias", "main_head/kernel", "main_head/bias"}
#: Panels with no data on this run by design, and why; the test also checks that they are indeed empty.
EXPECTED_EMPTY = {
    "gradtel-variables.json: All-zero gradients": (
        "it lists only variables with an all-zero gradient, and no variable of the demo has one"
    ),
}
#: Long enough to cover the whole run in range queries (the test lasts about a minute).
RUN_SECONDS = 600


def _identity(alert: dict[str, Any]) -> tuple[str, str]:
    return alert["labels"]["alertname"], alert["labels"].get("variable", "")


def _notified(webhook: WebhookReceiver) -> list[dict[str, Any]]:
    """Every firing alert the webhook receiver got."""
    return [alert for note in webhook.notifications for alert in note["alerts"] if alert["status"] == "firing"]


@pytest.fixture(scope="module")
def fired(demo_stack: StackConfig, webhook: WebhookReceiver) -> list[dict[str, Any]]:
    """The firing alerts at the webhook once all expected ones arrived (the other tests assert on that state)."""
    wait_for(
        lambda: {_identity(alert) for alert in _notified(webhook)} >= EXPECTED_ALERTS,
        240,
        f"{sorted(EXPECTED_ALERTS)} at the webhook receiver",
    )
    return _notified(webhook)


def test_alerts_reach_the_webhook_naming_the_variable_and_run(fired: list[dict[str, Any]], demo: DemoProcess) -> None:
    assert {_identity(alert) for alert in fired} == EXPECTED_ALERTS
    for alert in fired:
        labels, description = alert["labels"], alert["annotations"]["description"]
        # Alerts follow the job: no instance (a restart at another address continues the same alert).
        assert (labels["run"], labels["job"]) == (demo.run_id, "gradtel") and "instance" not in labels
        assert labels["variable"] in description and demo.run_id in description, description
        assert labels["severity"] == ("critical" if labels["alertname"] == NONFINITE else "warning")


def test_alerts_fire_in_prometheus_and_reach_alertmanager(fired: list[dict[str, Any]], demo_stack: StackConfig) -> None:
    prometheus = api_get(demo_stack.prometheus_url, "/api/v1/alerts")["data"]["alerts"]
    assert {_identity(alert) for alert in prometheus if alert["state"] == "firing"} == EXPECTED_ALERTS
    alertmanager = api_get(demo_stack.alertmanager_url, "/api/v2/alerts")
    assert {_identity(alert) for alert in alertmanager if alert["status"]["state"] == "active"} == EXPECTED_ALERTS


def test_no_alert_for_the_healthy_variables(
    fired: list[dict[str, Any]], demo_stack: StackConfig, demo: DemoProcess
) -> None:
    """Healthy variables are scraped, yet no alert names them, now or at any time of the run (pending too)."""
    url, run = demo_stack.prometheus_url, demo.run_id
    scraped = query(url, f'gradtel_gradient_norm{{run="{run}"}}')["data"]["result"]
    assert {series["metric"]["variable"] for series in scraped} >= HEALTHY, "the check below would be vacuous"
    active = api_get(url, "/api/v1/alerts")["data"]["alerts"]
    assert not [alert for alert in active if alert["labels"].get("variable") in HEALTHY], active
    healthy = "|".join(sorted(HEALTHY))
    history = query(url, f'count_over_time(ALERTS{{variable=~"{healthy}"}}[{RUN_SECONDS}s])')
    assert history["status"] == "success" and history["data"]["result"] == []
    # No run-level alert either (stalled, target down, norm exploding/vanishing) at any time.
    others = query(url, f'count_over_time(ALERTS{{alertname!~"{DISCONNECTED}|{NONFINITE}"}}[{RUN_SECONDS}s])')
    assert others["status"] == "success" and others["data"]["result"] == []


def test_calibration_was_scraped_healthy_before_turning_nan(
    fired: list[dict[str, Any]], demo_stack: StackConfig, demo: DemoProcess
) -> None:
    """The non-finite alert follows a real transition: finite gradients first, then NaN from DEMO_NAN_AT."""
    selector = f'{{run="{demo.run_id}", variable="calibration/c"}}'

    def value(expr: str) -> float:
        (series,) = query(demo_stack.prometheus_url, expr)["data"]["result"]
        return float(series["value"][1])

    finite_norm = value(f"max_over_time(gradtel_gradient_norm{selector}[{RUN_SECONDS}s])")
    assert math.isfinite(finite_norm) and finite_norm > 0
    assert value(f"min_over_time(gradtel_gradient_nonfinite_total{selector}[{RUN_SECONDS}s])") == 0
    assert value(f"gradtel_gradient_nonfinite_total{selector}") > 0


def test_every_dashboard_panel_returns_data_for_the_run(
    fired: list[dict[str, Any]], demo_stack: StackConfig, demo: DemoProcess
) -> None:
    """Each query as Grafana runs it (instant for tables, range otherwise), filtered to this run."""
    values = {
        "__rate_interval": "1m",
        "datasource": "prometheus",
        "job": "gradtel",
        "instance": demo.target,
        "run": demo.run_id,
        "worker": ".*",
        "optimizer": "adam",
        "layer": ".+",
        "variable": ".+",
    }
    panels = dashboard_queries()
    assert set(EXPECTED_EMPTY) <= {panel.where for panel in panels}, "EXPECTED_EMPTY names a panel that is gone"
    failures = []
    for panel in panels:
        expr = substitute(panel.expr, values)
        answer = (
            query(demo_stack.prometheus_url, expr)
            if panel.instant
            else query_range(demo_stack.prometheus_url, expr, RUN_SECONDS)
        )
        if answer["status"] != "success":
            failures.append(f"{panel.where}: {answer.get('error')}")
        elif bool(answer["data"]["result"]) == (panel.where in EXPECTED_EMPTY):
            state = "has data, but EXPECTED_EMPTY says" if answer["data"]["result"] else "is empty"
            failures.append(f"{panel.where} {state} ({EXPECTED_EMPTY.get(panel.where, 'no reason listed')}):\n{expr}")
    assert not failures, "\n".join(failures)


def test_a_nan_gradient_leaves_its_norm_out_and_keeps_the_global_norm(
    fired: list[dict[str, Any]], demo_stack: StackConfig, demo: DemoProcess
) -> None:
    """OpenTelemetry drops non-finite observations, so gradtel leaves the NaN variable's gauges out (its state is
    in the counters) and keeps the global norm over the finite gradients: the panel never goes blank."""
    url = demo_stack.prometheus_url
    nan_norm = query(url, f'gradtel_gradient_norm{{run="{demo.run_id}", variable="calibration/c"}}')
    assert nan_norm["data"]["result"] == []
    global_norm = query(url, f'gradtel_gradient_global_norm{{run="{demo.run_id}"}}')["data"]["result"]
    assert len(global_norm) == 1 and 0 < float(global_norm[0]["value"][1]) < float("inf")
    nonfinite = query(url, f'gradtel_gradient_nonfinite_total{{run="{demo.run_id}", variable="calibration/c"}}')
    assert float(nonfinite["data"]["result"][0]["value"][1]) > 0
