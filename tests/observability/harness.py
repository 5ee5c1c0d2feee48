"""Pieces of the end-to-end harness: a webhook receiver, two gradtel endpoints and fast shipped configs.

The fake endpoint serves gradtel's real metric names and labels through prometheus_client, so the harness
proves the path Prometheus -> rules -> Alertmanager -> receiver without TensorFlow; :class:`DemoProcess` is
the real thing, a ``gradtel demo`` training job. The configs are the shipped ones with only their intervals
shortened (scrape, evaluation, ``for:``, Alertmanager grouping), so an alert that takes minutes in
production takes seconds here. The dashboard helpers read the committed dashboard JSON, so the queries
tested are exactly the ones Grafana runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from deploy.generate import DASHBOARDS_DIR
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
        return [
            alert
            for note in self.notifications
            for alert in note["alerts"]
            if alert["labels"]["alertname"] == alertname and alert["status"] == status
        ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeGradtel:
    """A /metrics endpoint with gradtel's metrics for one run whose steps keep advancing.

    The run has one disconnected variable (head/kernel), one declared with expect_missing (aux/kernel), and
    one whose gradient turns non-finite (dense/kernel).
    """

    RUN: ClassVar[dict[str, str]] = {"run": "harness", "worker": "", "optimizer": "adam"}

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
        i[metrics.MISSING.name].labels(**self._variable("head/kernel"), cause="unused", expected="false").inc()
        i[metrics.MISSING.name].labels(**self._variable("aux/kernel"), cause="not_on_loss_path", expected="true").inc()
        i[metrics.NONFINITE.name].labels(**self._variable("dense/kernel")).inc()
        i[metrics.ZERO.name].labels(**self._variable("dense/kernel")).inc(0)
        # As gradtel does: a non-finite variable has no norm/max_abs series; the global norm is over the finite ones.
        i[metrics.GLOBAL_NORM.name].labels(**self.RUN).set(1.5)
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


def fast_deploy_dir(destination: Path, production_timing: bool = False) -> Path:
    """A copy of the shipped prometheus/ and alertmanager/ configs with every interval shortened; with
    ``production_timing`` Prometheus keeps the shipped scrape and evaluation intervals and rules (``for:``
    included), so alerts fire when they would in production, and only Alertmanager's grouping waits are cut."""
    for name in ("prometheus", "alertmanager"):
        shutil.copytree(DEPLOY_DIR / name, destination / name)
    if not production_timing:
        _shorten_prometheus(destination / "prometheus" / "prometheus.yml")
        _shorten_rules(destination / "prometheus" / "gradtel-rules.yml")
    _shorten_alertmanager(destination / "alertmanager" / "alertmanager.yml")
    return destination


def add_scrape_job(deploy_dir: Path, job: str, target: str) -> None:
    """A second training target in the copied prometheus.yml. ``gradtel stack`` maps only the shipped compose
    address to loopback, so the job names that address and relabels it to ``target``."""
    path = deploy_dir / "prometheus" / "prometheus.yml"
    document = yaml.safe_load(path.read_text())
    document["scrape_configs"].append(
        {
            "job_name": job,
            "static_configs": [{"targets": ["trainer:9464"]}],
            "relabel_configs": [{"target_label": "__address__", "replacement": target}],
        }
    )
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def api_get(base_url: str, path: str, params: Mapping[str, str | float] | None = None) -> Any:
    """GET a Prometheus or Alertmanager API path; returns the JSON answer (error answers included, not raised)."""
    url = f"{base_url}{path}?{urllib.parse.urlencode(params or {})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def query(prometheus_url: str, expr: str) -> dict[str, Any]:
    """Run an instant query; returns Prometheus's JSON answer (errors included, not raised)."""
    return api_get(prometheus_url, "/api/v1/query", {"query": expr})


def query_range(prometheus_url: str, expr: str, seconds: float, step: float = 1.0) -> dict[str, Any]:
    """Run a range query over the last ``seconds`` (what a Grafana time series panel asks for)."""
    end = time.time()
    return api_get(
        prometheus_url, "/api/v1/query_range", {"query": expr, "start": end - seconds, "end": end, "step": step}
    )


class DemoProcess:
    """``gradtel demo --steps 0`` as a subprocess: a real Keras training job serving gradtel's metrics.

    Its ``aux_head`` output has no loss (``aux_head/kernel`` and ``aux_head/bias`` never get a gradient) and
    ``calibration/c`` gets a NaN gradient from step ``nan_at`` on; ``encoder/*`` and ``main_head/*`` stay
    healthy. It trains until :meth:`close`.
    """

    def __init__(
        self,
        log: Path,
        run_id: str,
        nan_at: int | None = None,
        expect_missing: tuple[str, ...] = (),
        target: str | None = None,
    ) -> None:
        """``expect_missing``: run the demo under ``gradtel run --expect-missing ... --run-id`` (declared
        variables, the run id passed on the command line); ``target``: serve on this address (a restart)."""
        self.run_id = run_id
        self.target = target or f"127.0.0.1:{free_port()}"
        self.log = log
        # tests/conftest.py sets OTEL_METRICS_EXPORTER=none for in-process tests; this job must serve /metrics.
        env = {name: value for name, value in os.environ.items() if name != "OTEL_METRICS_EXPORTER"}
        # Every interval of this stack is compressed to 1 s (rules' `for`, scrapes): so is the endpoint's spacing of
        # collections, or two scrapes serving one collection would read as a 1 s stall.
        env.update(
            GRADTEL_RUN_ID=run_id,
            TF_CPP_MIN_LOG_LEVEL="2",
            GRADTEL_PROMETHEUS_MIN_INTERVAL="0",
            GRADTEL_PROMETHEUS_CPU_SHARE="1",
        )
        command = [sys.executable, "-m", "gradtel.cli", "demo", "--steps", "0", "--port", self.target.rsplit(":", 1)[1]]
        if nan_at is not None:
            command += ["--nan-at", str(nan_at)]
        if expect_missing:
            declared = [arg for pattern in expect_missing for arg in ("--expect-missing", pattern)]
            command = [sys.executable, "-m", "gradtel.cli", "run", "--run-id", run_id, *declared, "--", *command]
            del env["GRADTEL_RUN_ID"]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def steps(self) -> float:
        """The ``gradtel_steps_total`` served now (0 until the endpoint and the first step are up)."""
        if self.process.poll() is not None:
            raise AssertionError(f"gradtel demo exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.target}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        found = re.search(rf"^{metrics.STEPS.name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill ends a training process."""
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """Ctrl-C (the demo prints its table and shuts its exporter down), then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True)
class PanelQuery:
    """One query of a committed dashboard: a panel target or a template variable's values query."""

    where: str  # "<file>: <panel title>" or "<file>: variable <name>"
    expr: str
    instant: bool  # instant table queries; the others are range queries in Grafana


def dashboard_queries() -> list[PanelQuery]:
    """Every panel target and ``label_values`` variable query of dashboards/*.json."""
    found = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            found += [
                PanelQuery(f"{path.name}: {panel['title']}", target["expr"], bool(target.get("instant")))
                for target in panel.get("targets", [])
            ]
        for variable in board["templating"]["list"]:
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", str(variable.get("query", "")))
            if match:
                found.append(
                    PanelQuery(f"{path.name}: variable {variable['name']}", f"count({match.group(1)})", instant=True)
                )
    return found


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with its Grafana template variables (``$name``, ``${name}``) replaced by ``values[name]``.

    An unknown variable raises KeyError, so a new dashboard variable cannot slip through untested.
    """
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
