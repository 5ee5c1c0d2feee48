"""Fixtures of the observability tests; the slow ones start real Prometheus and Alertmanager processes.

The e2e fixtures are module-scoped: each e2e module gets its own stack and webhook receiver, and a module's
processes are gone before the next one starts (the fake run and the real training run never share alerts).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradtel.localstack import Stack, StackConfig
from tests.observability.harness import (
    DemoProcess,
    FakeGradtel,
    WebhookReceiver,
    fast_deploy_dir,
    free_port,
    wait_for,
)

#: The ``run`` label of the real training job (GRADTEL_RUN_ID).
DEMO_RUN_ID = "e2e-training"
#: Step from which ``calibration/c`` gets NaN gradients: late enough that Prometheus (started after the
#: first step, ready within about 2 s, then a first scrape) scrapes it healthy first (6,000 was once too early on
#: a quiet machine), early enough to come soon on a loaded machine
#: (the demo takes 300-1000 steps/s on 2 CPU cores, 60 on busy ones).
DEMO_NAN_AT = 9000


def require_binary(*names: str) -> str:
    """The first of ``names`` on PATH, or skip the test (CI installs the Debian packages)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"{' / '.join(names)} not installed (apt-get install prometheus prometheus-alertmanager)")


@pytest.fixture(scope="module")
def stack_binaries() -> None:
    """Skip before anything starts (TensorFlow included) when the stack cannot run."""
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")


def _run_stack(root: Path, target: str, webhook: WebhookReceiver) -> Iterator[StackConfig]:
    """The shipped stack (fast intervals) scraping ``target`` and notifying ``webhook``; stopped on exit."""
    config = StackConfig(
        data_dir=root / "data",
        deploy_dir=fast_deploy_dir(root / "deploy"),
        target=target,
        prometheus_port=free_port(),
        alertmanager_port=free_port(),
        webhook_url=webhook.url,
    )
    with Stack(config):
        yield config


@pytest.fixture(scope="module")
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def fake_gradtel() -> Iterator[FakeGradtel]:
    endpoint = FakeGradtel()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def stack(
    stack_binaries: None, tmp_path_factory: pytest.TempPathFactory, webhook: WebhookReceiver, fake_gradtel: FakeGradtel
) -> Iterator[StackConfig]:
    """The shipped stack (fast intervals) scraping the fake endpoint and notifying the webhook receiver."""
    yield from _run_stack(tmp_path_factory.mktemp("stack"), fake_gradtel.target, webhook)


@pytest.fixture(scope="module")
def demo(stack_binaries: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """A real ``gradtel demo`` training job, returned once it has taken its first optimizer step.

    Waiting for the first step matters with the shortened ``for:``: a run still tracing its step exports
    ``gradtel_steps_total 0``, which GradtelStepsStalled would (rightly, at ``for: 1s``) call stalled.
    """
    run = DemoProcess(tmp_path_factory.mktemp("demo") / "demo.log", DEMO_RUN_ID, DEMO_NAN_AT)
    try:
        wait_for(lambda: run.steps() > 0, 120, f"gradtel demo's first step on {run.target}")
        yield run
    finally:
        run.close()


@pytest.fixture(scope="module")
def demo_stack(
    tmp_path_factory: pytest.TempPathFactory, webhook: WebhookReceiver, demo: DemoProcess
) -> Iterator[StackConfig]:
    """The shipped stack (fast intervals) scraping the training job and notifying the webhook receiver."""
    yield from _run_stack(tmp_path_factory.mktemp("demo-stack"), demo.target, webhook)
