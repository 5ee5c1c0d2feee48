"""Export faults never reach training: a taken port, a collector that is down and comes back, a Prometheus
server that dies and restarts, and an endpoint whose server thread dies or whose socket is closed underneath.

Each test runs real processes and sockets. Training speed is never timed; what is asserted is that steps keep
advancing through the fault, that the process ends normally, that memory and threads stay bounded, and that
the numbers seen after recovery continue the numbers seen before.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from tests.faults.helpers import (
    Processes,
    free_port,
    parse,
    progress,
    read_json,
    rss_bytes,
    scrape_body,
    trainee,
    values,
    wait_for,
)


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def _gradtel_lines(stderr: str) -> list[str]:
    """gradtel's own log lines (the logging module's last-resort handler prints them bare)."""
    return [line for line in stderr.splitlines() if line.startswith("gradtel:") or " gradtel: " in line]


@pytest.mark.slow
def test_a_taken_port_is_one_warning_and_the_run_completes(procs, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        report = tmp_path / "report.json"
        proc = procs.start(
            trainee("--steps", "30", report=str(report)), {"OTEL_EXPORTER_PROMETHEUS_PORT": str(port)}, name="taken"
        )
        status = procs.wait(proc, 120)
    err = procs.output(proc)[1]
    assert status == 0, err[-3000:]
    lines = [line for line in _gradtel_lines(err) if "metrics" in line and "gradients do not exist" not in line]
    assert len(lines) == 1 and "cannot serve metrics" in lines[0] and str(port) in lines[0], lines
    assert read_json(report)["optimizers"][0]["steps"] == 30


@pytest.mark.slow
def test_otlp_collector_down_then_back_training_goes_on_and_export_resumes(procs, tmp_path, otlp):
    """The collector is unreachable for the first seconds (a push every 500 ms fails after at most 1 s), then a
    real OTLP/HTTP receiver comes up on that port: the next pushes arrive, counting from where training is."""
    prog, stop, done = tmp_path / "progress", tmp_path / "stop", tmp_path / "done"
    proc = procs.start(
        trainee("--steps", "0", "--stop", str(stop), "--progress", str(prog), "--every", "5", "--done", str(done)),
        {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        },
        name="outage",
    )
    wait_for(lambda: progress(prog) > 0 or proc.poll() is not None, 120, "the first steps")
    assert proc.poll() is None, procs.output(proc)[1][-3000:]

    time.sleep(1.0)  # a couple of failed pushes first: the steady state of an outage
    rss_start, threads_start = rss_bytes(proc.pid), _threads(proc.pid)
    seen = [progress(prog)]
    for _ in range(6):  # 6 s of outage, about 12 failed pushes
        time.sleep(1.0)
        seen.append(progress(prog))
    assert all(b > a for a, b in itertools.pairwise(seen)), f"steps stalled during the outage: {seen}"
    assert rss_bytes(proc.pid) - rss_start < 64 << 20, "memory grew by 64 MiB in 6 s of outage"
    assert _threads(proc.pid) <= threads_start + 2, "threads pile up while the collector is down"
    assert otlp.received == []

    at_recovery = progress(prog)
    otlp.start()
    wait_for(lambda: len(otlp.steps()) >= 3, 30, "three pushes after the collector came back")
    stop.touch()
    assert procs.wait(proc, 60) == 0, procs.output(proc)[1][-3000:]

    steps = otlp.steps()
    # Cumulative: the counts continue (the first delivery may be a retried batch from late in the outage),
    # nothing restarts from zero, and later pushes catch up with training.
    assert seen[0] <= steps[0] and steps == sorted(steps)
    assert at_recovery <= steps[-1] <= int(done.read_text())
    for key in (("gradtel_gradient_missing", "cut"), ("gradtel_gradient_zero", "dead")):
        series = [pushed[key] for _, pushed in otlp.received]
        assert series == sorted(series) and series[0] >= seen[0], key  # per-variable counters continue too
    # (that the very last push carries the very last step is test_process_ends' shutdown-flush tests)


# --- a real Prometheus server scraping the endpoint, killed and restarted ------------------------------------
def _prometheus(procs: Processes, binary: str, config: Path, data: Path, port: int):
    proc = procs.start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        name="prometheus",
    )

    def ready() -> bool:
        assert proc.poll() is None, procs.output(proc)[1][-3000:]
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    wait_for(ready, 60, "Prometheus to be ready")
    return proc


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.slow
def test_prometheus_restarting_mid_run_never_sees_a_counter_go_backwards(procs, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    target, port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n"
        f"  - job_name: gradtel\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
    )
    prog, stop = tmp_path / "progress", tmp_path / "stop"
    trainer = procs.start(
        trainee("--steps", "0", "--stop", str(stop), "--progress", str(prog)),
        {"OTEL_EXPORTER_PROMETHEUS_PORT": str(target), "GRADTEL_RUN_ID": "restart"},
        name="trainer",
    )
    wait_for(lambda: progress(prog) > 0 or trainer.poll() is not None, 120, "the first steps")
    server = _prometheus(procs, binary, config, tmp_path / "data", port)
    wait_for(
        lambda: (
            len(_query(port, "gradtel_steps_total[1m]")[:1] and _query(port, "gradtel_steps_total[1m]")[0]["values"])
            >= 3
        ),
        30,
        "three scrapes",
    )
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    killed_at = time.time()
    time.sleep(2.0)
    assert trainer.poll() is None
    server = _prometheus(procs, binary, config, tmp_path / "data", port)
    restarted_at = time.time()
    wait_for(
        lambda: (
            sum(
                float(t) > restarted_at
                for t, _ in (_query(port, "gradtel_steps_total[5m]") or [{"values": []}])[0]["values"]
            )
            >= 3
        ),
        30,
        "three scrapes after the restart",
    )
    stop.touch()
    assert procs.wait(trainer, 60) == 0, procs.output(trainer)[1][-3000:]

    series = _query(port, '{__name__=~"gradtel_.*_total", run="restart"}[10m]')
    names = {s["metric"]["__name__"] for s in series}
    assert {"gradtel_steps_total", "gradtel_gradient_missing_total", "gradtel_gradient_zero_total"} <= names
    for s in series:
        points = [(float(t), float(v)) for t, v in s["values"]]
        assert [v for _, v in points] == sorted(v for _, v in points), f"went backwards: {s['metric']}"
    steps = next(s for s in series if s["metric"]["__name__"] == "gradtel_steps_total")
    times = [float(t) for t, _ in steps["values"]]
    assert any(t < killed_at for t in times) and any(t > restarted_at for t in times)
    for name in names:  # resets() drops the metric name: one query per metric
        assert all(float(r["value"][1]) == 0 for r in _query(port, f'resets({name}{{run="restart"}}[10m])')), name


# --- the endpoint's own server failing inside the training process -------------------------------------------
@pytest.fixture
def training(exporter):
    """An in-process endpoint and an instrumented optimizer with a tf.function step: (endpoint, step, handle)."""
    started = exporter(run_id="endpoint-fault")
    var = keras.Variable(np.ones(3, "float32"), name="v")
    optimizer = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(optimizer, name=f"endpoint-fault-{id(optimizer)}")

    @tf.function
    def step() -> None:
        optimizer.apply_gradients([(tf.constant([1.0, 2.0, 2.0]), var)])

    yield started.endpoint, step, handle
    gradtel.uninstrument(optimizer)


def _listening_socket(port: int) -> socket.socket:
    """The Python socket object listening on ``port`` in this process, whatever server owns it."""
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket) and obj.fileno() != -1:
            try:
                if obj.getsockname()[1] == port and obj.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    return obj
            except OSError:
                continue
    raise AssertionError(f"no listening socket on port {port}")


def _server_threads() -> dict[int, threading.Thread]:
    return {t.native_id: t for t in threading.enumerate() if t.native_id is not None}


def _cpu_seconds(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kill_serve_thread(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """Inject a fault in the accept path of the server on ``port``: its serve loop raises and the thread ends."""
    original = socketserver.BaseServer._handle_request_noblock

    def dying(self: socketserver.BaseServer) -> None:
        if self.server_address[1] == port:
            raise RuntimeError("injected: the metrics server thread dies")
        original(self)

    monkeypatch.setattr(socketserver.BaseServer, "_handle_request_noblock", dying)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # keep pytest's thread-exception hook quiet


def test_the_endpoint_thread_dying_leaves_training_alone(training, monkeypatch):
    """The server loop raises (an injected fault in its accept path): steps keep being measured exactly."""
    (_, port), step, handle = training
    for _ in range(5):
        step()
    assert values(parse(scrape_body(port)), "gradtel_steps")
    _kill_serve_thread(monkeypatch, port)
    with pytest.raises(OSError):
        scrape_body(port, timeout=2)  # accepted by the kernel, never answered: the thread is gone
    for _ in range(5):
        step()
    assert handle.totals()[0] == 10


def test_the_endpoint_thread_dying_is_one_clear_log_line(training, monkeypatch, caplog):
    (_, port), step, _ = training
    step()
    _kill_serve_thread(monkeypatch, port)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        with pytest.raises(OSError):
            scrape_body(port, timeout=2)
        time.sleep(0.5)
        for _ in range(3):
            step()
    lines = [r.getMessage() for r in caplog.records if r.name == "gradtel"]
    assert len(lines) == 1 and str(port) in lines[0], lines


def test_the_endpoint_socket_closed_underneath_costs_no_cpu_and_is_logged_once(training, caplog):
    (_, port), step, handle = training
    step()
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        _listening_socket(port).close()
        cpu = {tid: _cpu_seconds(tid) for tid in _server_threads()}
        for _ in range(20):
            step()
            time.sleep(0.1)
        spent = {tid: _cpu_seconds(tid) - c for tid, c in cpu.items() if Path(f"/proc/self/task/{tid}").exists()}
    assert handle.totals()[0] == 21  # training went on, measured
    threads = _server_threads()
    busy = {
        threads[t].name: s
        for t, s in spent.items()
        if t in threads and threads[t] is not threading.main_thread() and s > 0.5
    }
    assert busy == {}, f"threads burning CPU after the endpoint's socket was closed: {busy}"
    lines = [r.getMessage() for r in caplog.records if r.name == "gradtel"]
    assert len(lines) == 1 and str(port) in lines[0], lines
