"""E2E over a job's life with real processes and production timing: a restart pages nobody, a disconnected
variable pages within 2 minutes.

Two real training jobs (``gradtel demo``) are scraped by real Prometheus running the shipped rules unmodified
(15 s scrapes and evaluations, the shipped ``for:``), and Alertmanager (grouping waits cut to 1 s) notifies a
webhook receiver:

- a healthy job (its ``aux_head`` declared with ``--expect-missing``, the run id given with ``--run-id``) is
  killed with SIGKILL and restarted with the same run id on the same address: no alert may fire or even be
  pending for it, and no notification may name it;
- a job with a disconnected head: GradtelVariableDisconnected must fire for both of its variables; the time from
  its first step (the first missing gradient) to the firing alert is measured and printed (the assertion waits
  generously, 240 s; the shipped rules aim at 2 minutes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from gradtel.localstack import Stack, StackConfig
from tests.observability.harness import (
    DemoProcess,
    WebhookReceiver,
    add_scrape_job,
    api_get,
    fast_deploy_dir,
    free_port,
    query,
    wait_for,
)

pytestmark = pytest.mark.slow

HEALTHY_RUN = "e2e-restarted"
BROKEN_RUN = "e2e-disconnected"
DISCONNECTED = "GradtelVariableDisconnected"
BROKEN_VARIABLES = {"aux_head/kernel", "aux_head/bias"}
#: Seconds the restarted process is watched after Prometheus saw it (the run-level alerts' windows start there).
WATCH_AFTER_RESTART_S = 45


class Timeline:
    """What the test observed, and when (time.monotonic())."""

    broken_first_step: float = 0.0
    disconnected_firing: float = 0.0
    disconnected_notified: float = 0.0


@pytest.fixture(scope="module")
def life(
    stack_binaries: None, tmp_path_factory: pytest.TempPathFactory, webhook: WebhookReceiver
) -> Iterator[tuple[StackConfig, Timeline, list[DemoProcess]]]:
    """The stack, then both jobs; the healthy one killed and restarted once the broken one has paged."""
    root = tmp_path_factory.mktemp("restart")
    healthy_target, broken_target = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    deploy = fast_deploy_dir(root / "deploy", production_timing=True)
    add_scrape_job(deploy, "gradtel-broken", broken_target)
    config = StackConfig(
        data_dir=root / "data",
        deploy_dir=deploy,
        target=healthy_target,
        prometheus_port=free_port(),
        alertmanager_port=free_port(),
        webhook_url=webhook.url,
    )
    timeline, processes = Timeline(), []
    with Stack(config):
        try:
            healthy = DemoProcess(
                root / "healthy.log", HEALTHY_RUN, expect_missing=("aux_head/*",), target=healthy_target
            )
            broken = DemoProcess(root / "broken.log", BROKEN_RUN, target=broken_target)
            processes += [healthy, broken]
            wait_for(lambda: broken.steps() > 0, 180, "the broken job's first step")
            timeline.broken_first_step = time.monotonic()
            wait_for(lambda: healthy.steps() > 0, 180, "the healthy job's first step")
            wait_for(lambda: _scraped_starts(config) >= 1, 60, "a scrape of the healthy job")
            healthy.kill()
            restarted = DemoProcess(
                root / "healthy.log", HEALTHY_RUN, expect_missing=("aux_head/*",), target=healthy_target
            )
            processes.append(restarted)
            wait_for(
                lambda: _firing(config, DISCONNECTED, BROKEN_RUN) >= BROKEN_VARIABLES,
                240,
                f"{DISCONNECTED} firing for {sorted(BROKEN_VARIABLES)}",
            )
            timeline.disconnected_firing = time.monotonic()
            wait_for(
                lambda: {a["labels"]["variable"] for a in webhook.alerts(DISCONNECTED)} >= BROKEN_VARIABLES,
                60,
                f"{DISCONNECTED} at the webhook receiver",
            )
            timeline.disconnected_notified = time.monotonic()
            wait_for(lambda: _scraped_starts(config) >= 2, 120, "a scrape of the restarted healthy job")
            time.sleep(WATCH_AFTER_RESTART_S)
            yield config, timeline, processes
        finally:
            for process in processes:
                process.close()


def _scraped_starts(config: StackConfig) -> int:
    """How many processes of the healthy run Prometheus has scraped (distinct start times)."""
    answer = query(
        config.prometheus_url, f'changes(gradtel_process_start_time_seconds{{run="{HEALTHY_RUN}"}}[10m]) + 1'
    )
    return int(float(answer["data"]["result"][0]["value"][1])) if answer["data"]["result"] else 0


def _firing(config: StackConfig, alertname: str, run: str) -> set[str]:
    alerts = api_get(config.prometheus_url, "/api/v1/alerts")["data"]["alerts"]
    return {
        a["labels"].get("variable", "")
        for a in alerts
        if a["labels"]["alertname"] == alertname and a["labels"].get("run") == run and a["state"] == "firing"
    }


def test_the_disconnected_head_pages_within_two_minutes_of_its_first_missing_step(
    life: tuple[StackConfig, Timeline, list[DemoProcess]],
) -> None:
    config, timeline, _ = life
    to_firing = timeline.disconnected_firing - timeline.broken_first_step
    to_webhook = timeline.disconnected_notified - timeline.broken_first_step
    print(
        f"\nGradtelVariableDisconnected: firing in Prometheus {to_firing:.0f} s and at the webhook "
        f"{to_webhook:.0f} s after the first missing step (15 s scrapes, shipped rules)"
    )
    firing = [
        a
        for a in api_get(config.prometheus_url, "/api/v1/alerts")["data"]["alerts"]
        if a["labels"]["alertname"] == DISCONNECTED and a["state"] == "firing"
    ]
    assert {a["labels"]["variable"] for a in firing} == BROKEN_VARIABLES
    for alert in firing:  # one alert per variable of the job: no instance, no worker
        assert alert["labels"]["run"] == BROKEN_RUN and "instance" not in alert["labels"]


def test_the_restarted_healthy_job_raises_no_alert(
    life: tuple[StackConfig, Timeline, list[DemoProcess]], webhook: WebhookReceiver
) -> None:
    config, _, processes = life
    assert _scraped_starts(config) == 2, "Prometheus must have seen both processes of the healthy run"
    steps = query(config.prometheus_url, f'gradtel_steps_total{{run="{HEALTHY_RUN}"}}')["data"]["result"]
    assert len(steps) == 1 and float(steps[0]["value"][1]) > 0, "the restarted process trains"
    # No alert for the run at any time, pending included (the run-level alerts know a young process).
    history = query(config.prometheus_url, f'count_over_time(ALERTS{{run="{HEALTHY_RUN}"}}[15m])')
    assert history["status"] == "success" and history["data"]["result"] == [], history
    never_firing = query(
        config.prometheus_url, f'count_over_time(ALERTS{{alertstate="firing", alertname!="{DISCONNECTED}"}}[15m])'
    )
    assert never_firing["data"]["result"] == [], never_firing
    notified: list[dict[str, Any]] = [alert for note in webhook.notifications for alert in note["alerts"]]
    assert notified and all(alert["labels"].get("run") == BROKEN_RUN for alert in notified)
    assert processes[0].process.returncode is not None and processes[2].process.poll() is None
