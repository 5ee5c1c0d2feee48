"""Fixtures of the observability tests; the slow ones start real Prometheus and Alertmanager processes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradtel.localstack import Stack, StackConfig
from tests.observability.harness import FakeGradtel, WebhookReceiver, fast_deploy_dir, free_port


def require_binary(*names: str) -> str:
    """The first of ``names`` on PATH, or skip the test (CI installs the Debian packages)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"{' / '.join(names)} not installed (apt-get install prometheus prometheus-alertmanager)")


@pytest.fixture(scope="session")
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def fake_gradtel() -> Iterator[FakeGradtel]:
    endpoint = FakeGradtel()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, webhook: WebhookReceiver,
          fake_gradtel: FakeGradtel) -> Iterator[StackConfig]:
    """The shipped stack (fast intervals) scraping the fake endpoint and notifying the webhook receiver."""
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    root: Path = tmp_path_factory.mktemp("stack")
    config = StackConfig(
        data_dir=root / "data",
        deploy_dir=fast_deploy_dir(root / "deploy"),
        target=fake_gradtel.target,
        prometheus_port=free_port(),
        alertmanager_port=free_port(),
        webhook_url=webhook.url,
    )
    with Stack(config):
        yield config
