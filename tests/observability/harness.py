"""Pieces of the end-to-end harness: a webhook receiver, a fake gradtel endpoint and fast shipped configs.

The fake endpoint serves gradtel's real metric names and labels through prometheus_client, so the harness
proves the path Prometheus -> rules -> Alertmanager -> receiver without TensorFlow. The configs are the
shipped ones with only their intervals shortened (scrape, evaluation, ``for:``, Alertmanager grouping), so
an alert that takes minutes in production takes seconds here.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from gradtel import metrics

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
FAST = "1s"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class WebhookReceiver:
    """An HTTP server that records Alertmanager's webhook notifications (JSON bodies) in order."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Silence per-request logging."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self, alertname: str, status: str = "firing") -> list[dict[str, Any]]:
        """Every received alert named ``alertname`` with ``status``."""
        return [alert for note in self.notifications for alert in note["alerts"]
                if alert["labels"]["alertname"] == alertname and alert["status"] == status]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeGradtel:
    """A /metrics endpoint with gradtel's metrics for one run whose steps keep advancing.

    The run has one disconnected variable (head/kernel), one declared with expect_missing (aux/kernel), and
    one whose gradient turns non-finite (dense/kernel).
    """

    RUN: ClassVar[dict[str, str]] = {"run": "harness", "optimizer": "adam"}

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def make(metric: metrics.Metric) -> Any:
            kind = Counter if metric.kind is metrics.Kind.COUNTER else Gauge
            return kind(metric.otel_name, metric.description, metric.labels, registry=self.registry)

        self.instruments = {metric.name: make(metric) for metric in metrics.ALL}
        self._server, self._thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.target = f"127.0.0.1:{self._server.server_address[1]}"
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, daemon=True)
        self._ticker.start()

    def _variable(self, name: str) -> dict[str, str]:
        return {**self.RUN, "variable": name, "layer": name.split("/")[0]}

    def _tick(self) -> None:
        """One optimizer step."""
        i = self.instruments
        i[metrics.STEPS.name].labels(**self.RUN).inc()
        i[metrics.MISSING.name].labels(**self._variable("head/kernel"), cause="unused",
                                       expected="false").inc()
        i[metrics.MISSING.name].labels(**self._variable("aux/kernel"), cause="not_on_loss_path",
                                       expected="true").inc()
        i[metrics.NONFINITE.name].labels(**self._variable("dense/kernel")).inc()
        i[metrics.ZERO.name].labels(**self._variable("dense/kernel")).inc(0)
        i[metrics.NORM.name].labels(**self._variable("dense/kernel")).set(float("nan"))
        i[metrics.MAX_ABS.name].labels(**self._variable("dense/kernel")).set(float("inf"))
        i[metrics.GLOBAL_NORM.name].labels(**self.RUN).set(float("nan"))
        for state, count in {"ok": 0, "missing": 1, "zero": 0, "nonfinite": 1, "expected_missing": 1}.items():
            i[metrics.VARIABLES.name].labels(**self.RUN, state=state).set(count)

    def _tick_forever(self) -> None:
        while not self._stop.wait(0.1):
            self._tick()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


def _shorten_rules(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FAST
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def _shorten_prometheus(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    document["global"].update(scrape_interval=FAST, scrape_timeout=FAST, evaluation_interval=FAST)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def _shorten_alertmanager(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    routes: Iterator[dict[str, Any]] = iter([document["route"], *document["route"].get("routes", [])])
    for route in routes:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = FAST
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def fast_deploy_dir(destination: Path) -> Path:
    """A copy of the shipped prometheus/ and alertmanager/ configs with every interval shortened."""
    for name in ("prometheus", "alertmanager"):
        shutil.copytree(DEPLOY_DIR / name, destination / name)
    _shorten_prometheus(destination / "prometheus" / "prometheus.yml")
    _shorten_rules(destination / "prometheus" / "gradtel-rules.yml")
    _shorten_alertmanager(destination / "alertmanager" / "alertmanager.yml")
    return destination


def query(prometheus_url: str, expr: str) -> dict[str, Any]:
    """Run an instant query; returns Prometheus's JSON answer (errors included, not raised)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())
