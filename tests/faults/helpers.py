"""What the fault-injection tests share: real processes, real sockets, real scrapes, a real OTLP receiver.

Every process a test starts goes through :class:`Processes` (its own session, killed as a group at teardown),
every server through a fixture with a finalizer, and every port is a free loopback port, so a failing test
never leaves a training job or a listener behind for the next one.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent
GRADTEL = str(BIN / "gradtel")
TRAINEE = str(Path(__file__).with_name("trainee.py"))
ROOT = Path(__file__).resolve().parents[2]
#: The tests default to OTEL_METRICS_EXPORTER=none (tests/conftest.py); child processes get what a test sets.
BASE_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GRADTEL_"))},
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}
#: Counters as the text exposition names them (prometheus_client's parser strips the _total suffix).
COUNTERS = ("gradtel_steps", "gradtel_gradient_missing", "gradtel_gradient_zero", "gradtel_gradient_nonfinite")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Processes:
    """Child processes of one test: each in its own session, so teardown can kill it and its children."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str] | None = None, name: str = "proc") -> subprocess.Popen:
        """Start ``argv`` with stdout/stderr in files (never a pipe that could fill up and block the child)."""
        n = len(self._procs)
        out = open(self._log_dir / f"{name}-{n}.out", "w")  # noqa: SIM115 - closed with the process
        err = open(self._log_dir / f"{name}-{n}.err", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            argv, env={**BASE_ENV, **(env or {})}, stdout=out, stderr=err, start_new_session=True, cwd=self._log_dir
        )
        proc.stdout_path, proc.stderr_path = out.name, err.name  # type: ignore[attr-defined]
        proc._files = (out, err)  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    @staticmethod
    def output(proc: subprocess.Popen) -> tuple[str, str]:
        return Path(proc.stdout_path).read_text(), Path(proc.stderr_path).read_text()  # type: ignore[attr-defined]

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        """The exit status, or an assertion naming the child's stderr when it does not end in time."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{proc.args} did not end within {timeout}s:\n{self.output(proc)[1][-3000:]}"
            ) from None

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            for f in proc._files:  # type: ignore[attr-defined]
                f.close()


def trainee(*args: str, report: str | None = None, run: bool = True) -> list[str]:
    """argv of the shared training script (tests/faults/trainee.py), under ``gradtel run`` unless ``run=False``."""
    script = [sys.executable, TRAINEE, *args]
    if not run:
        return script
    return [GRADTEL, "run", *(["--report", report] if report else []), "--", *script]


def progress(path: Path) -> int:
    """The step count a trainee last wrote (0 before the first)."""
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def scrape_body(
    port: int,
    *,
    scheme: str = "http",
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> str:
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return response.read().decode()


def parse(body: str) -> dict[str, list]:
    """Metric family name -> samples, by prometheus_client's own parser (the format Prometheus reads)."""
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


def values(families: dict[str, list], metric: str, **labels: str) -> dict[tuple, float]:
    """(variable, optimizer) -> value of ``metric``'s samples whose labels include ``labels``."""
    out = {}
    for s in families.get(metric, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            key = (s.labels.get("variable"), s.labels.get("optimizer"))
            assert key not in out or metric == "gradtel_variables", f"two {metric} series for {key}"
            out[key] = s.value
    return out


def series_key(sample: Any) -> tuple:
    return (sample.name, tuple(sorted(sample.labels.items())))


def counter_samples(families: dict[str, list]) -> dict[tuple, float]:
    """Every counter series of one scrape (the _total samples), keyed by name and labels."""
    return {series_key(s): s.value for m in COUNTERS for s in families.get(m, []) if s.name.endswith("_total")}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def listening_inodes(port: int) -> dict[str, str]:
    """inode -> local address of the TCP sockets LISTENing on ``port`` (from /proc/net/tcp and tcp6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: TCP_LISTEN
                found[fields[9]] = address
    return found


def socket_inodes(pid: int | str = "self") -> set[str]:
    """The socket inodes among a process's open file descriptors."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


# --- a real OTLP/HTTP receiver ----------------------------------------------------------------------------------
class OtlpReceiver:
    """An OTLP/HTTP metrics endpoint on a fixed loopback port; decodes each ExportMetricsServiceRequest.

    ``received`` holds ``(monotonic time, {(metric, variable): value})`` per request, so a test can say what
    arrived when (before or after an outage, only at exit, ...).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[float, dict[tuple[str, str | None], float]]] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
                    ExportMetricsServiceRequest,
                )

                request = ExportMetricsServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.received.append((time.monotonic(), points(request)))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """No access log."""

        self._handler = Handler

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def steps(self) -> list[float]:
        """gradtel_steps of every request, in arrival order."""
        return [p[("gradtel_steps", None)] for _, p in self.received if ("gradtel_steps", None) in p]


def points(request: Any) -> dict[tuple[str, str | None], float]:
    """(metric, variable label) -> value of every data point in one OTLP request."""
    out = {}
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                data = metric.sum if metric.HasField("sum") else metric.gauge
                for p in data.data_points:
                    attrs = {a.key: a.value.string_value for a in p.attributes}
                    if metric.name == "gradtel_variables":
                        continue
                    out[(metric.name, attrs.get("variable"))] = p.as_double if p.HasField("as_double") else p.as_int
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
