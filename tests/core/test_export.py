"""The OpenTelemetry export: a real HTTP scrape, OTLP push to a real receiver, console, the app's provider."""

from __future__ import annotations

import http.server
import json
import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import typing
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families

import gradtel
from gradtel import export
from gradtel.config import Config
from gradtel.series import SeriesPolicy
from tests.core.helpers import free_port, numpy_norm


def scrape(port: int) -> dict[str, list]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


def sample(samples: list, **labels: str) -> float:
    found = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (labels, samples)
    return found[0]


@pytest.fixture
def exporter(request):
    """A real endpoint on a free port; ``@pytest.mark.parametrize("exporter", [SeriesPolicy(...)], indirect=True)``
    sets the series policy."""
    export.shutdown()
    policy = getattr(request, "param", SeriesPolicy())
    started = export.ensure_started(Config(prometheus_port=free_port(), run_id="test-run", series=policy))
    yield started
    export.shutdown()


def test_scrape_values_equal_independently_computed_ones(exporter):
    variables = [
        keras.Variable(np.zeros((2, 3), "float32"), name="a"),
        keras.Variable(np.zeros((3,), "float32"), name="z"),
        keras.Variable(np.zeros((1,), "float32"), name="gone"),
    ]
    opt, lean = keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="scraped", max_abs=True)
    gradtel.instrument(lean, name="lean")  # the default statistics: no max |g|
    g_a = tf.constant([[1.0, -2.0, 2.0], [0.0, 4.0, -1.0]])
    for _ in range(3):
        opt.apply_gradients([(g_a, variables[0]), (tf.zeros(3), variables[1]), (None, variables[2])])
    lean.apply_gradients([(g_a, variables[0])])

    metrics = scrape(exporter.endpoint[1])
    base = {"run": "test-run", "optimizer": "scraped"}
    assert sample(metrics["gradtel_steps"], **base) == 3
    assert sample(metrics["gradtel_gradient_norm"], variable="a", layer="", **base) == pytest.approx(numpy_norm(g_a))
    assert sample(metrics["gradtel_gradient_max_abs"], variable="a", **base) == 4.0
    assert sample(metrics["gradtel_gradient_norm"], variable="a", run="test-run", optimizer="lean") == pytest.approx(
        numpy_norm(g_a)
    )
    assert not [s for s in metrics["gradtel_gradient_max_abs"] if s.labels["optimizer"] == "lean"]
    assert sample(metrics["gradtel_gradient_zero"], variable="z", **base) == 3
    assert sample(metrics["gradtel_gradient_zero"], variable="a", **base) == 0
    assert sample(metrics["gradtel_gradient_nonfinite"], variable="a", **base) == 0
    assert sample(metrics["gradtel_gradient_missing"], variable="gone", expected="false", **base) == 3
    assert sample(metrics["gradtel_gradient_global_norm"], **base) == pytest.approx(numpy_norm(g_a))
    states = {s.labels["state"]: s.value for s in metrics["gradtel_variables"] if s.labels["optimizer"] == "scraped"}
    assert states == {
        "ok": 1,
        "zero": 1,
        "missing": 1,
        "nonfinite": 0,
        "expected_missing": 0,
        "replica_disagreement": 0,
    }
    # prometheus_client's parser strips _total from counter family names; the exposition has it.
    body = urllib.request.urlopen(f"http://127.0.0.1:{exporter.endpoint[1]}/metrics").read().decode()
    assert "# TYPE gradtel_gradient_missing_total counter" in body
    assert 'service_name="gradtel"' in body and 'gradtel_run_id="test-run"' in body  # target_info
    gradtel.uninstrument(opt)


@pytest.mark.parametrize("exporter", [SeriesPolicy(mode="variable")], indirect=True)
def test_more_series_than_the_sdk_default_limit_are_not_folded(exporter):
    n = 2500  # opentelemetry-sdk folds everything past 2,000 series per metric by default
    variables = [keras.Variable(np.zeros((1,), "float32"), name=f"v{i}") for i in range(n)]
    opt = keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="wide")
    opt.apply_gradients([(tf.fill([1], float(i)), v) for i, v in enumerate(variables)])
    norms = [s for s in scrape(exporter.endpoint[1])["gradtel_gradient_norm"] if s.labels["optimizer"] == "wide"]
    assert len(norms) == n
    assert not any("otel_metric_overflow" in s.labels for s in norms)
    assert {s.labels["variable"]: s.value for s in norms}["v1234"] == 1234.0
    gradtel.uninstrument(opt)


def test_port_in_use_warns_once_and_training_goes_on(caplog):
    export.shutdown()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="gradtel"):
            started = export.ensure_started(Config(prometheus_port=port))
            var = keras.Variable(np.ones(2, "float32"), name="p")
            opt = keras.optimizers.SGD(1.0)
            gradtel.instrument(opt, name="port-taken")
            opt.apply_gradients([(tf.ones(2), var)])
    assert started is not None and started.endpoint is None
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "cannot serve metrics" in r.message)
    ) == 1
    np.testing.assert_allclose(var.numpy(), [0.0, 0.0])
    export.shutdown()


@pytest.mark.parametrize(
    ("env", "message", "exporters"),
    [
        (
            {"OTEL_EXPORTER_PROMETHEUS_PORT": "http"},
            "OTEL_EXPORTER_PROMETHEUS_PORT='http': expected a TCP port 0-65535; the Prometheus pull endpoint is off",
            (),
        ),
        ({"OTEL_METRICS_EXPORTER": "zipkin"}, "OTEL_METRICS_EXPORTER='zipkin': expected a comma-separated list", ()),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='http/json': expected http/protobuf or grpc; the OTLP push is off",
            (),
        ),
        (
            {"GRADTEL_MAX_SERIES": "0"},
            "GRADTEL_MAX_SERIES='0': expected an integer >= 1; using the default, 100000",
            ("prometheus",),
        ),
        (
            {"GRADTEL_TLS_CERT_FILE": "/c.pem"},
            "GRADTEL_TLS_KEY_FILE is not set: expected it set together with GRADTEL_TLS_CERT_FILE",
            (),
        ),
    ],
)
def test_bad_configuration_says_what_was_expected(env, message, exporters):
    config = Config.from_env(env)
    assert [str(p) for p in config.problems] == [next(str(p) for p in config.problems if message in str(p))]
    assert config.exporters == exporters


# --- subprocesses: the exporter is set up from the environment, once per process -------------------------------
TRAIN = textwrap.dedent("""
    import keras, numpy as np, tensorflow as tf, gradtel
    from gradtel import export
    v = keras.Variable(np.zeros(4, "float32"), name="w")
    u = keras.Variable(np.zeros(1, "float32"), name="cut")
    opt = keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="sub")
    for _ in range(5):
        opt.apply_gradients([(tf.constant([3.0, 4.0, 0.0, 0.0]), v), (None, u)])
""")


def run_script(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


class _OtlpReceiver(http.server.BaseHTTPRequestHandler):
    """A real OTLP/HTTP endpoint: decodes ExportMetricsServiceRequest protobufs."""

    received: typing.ClassVar[list] = []

    def do_POST(self):
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        type(self).received.append((self.path, request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_otlp_push_reaches_a_receiver_with_resource_attributes():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtlpReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _OtlpReceiver.received = []
    try:
        result = run_script(
            TRAIN + "export.shutdown()\n",
            {
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                "OTEL_SERVICE_NAME": "trainer-x",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
                "GRADTEL_RUN_ID": "otlp-run",
            },
        )
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert _OtlpReceiver.received, "no OTLP export arrived"
    path, request = _OtlpReceiver.received[-1]
    assert path == "/v1/metrics"
    resource = {a.key: a.value.string_value for a in request.resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "trainer-x"
    assert resource["deployment.environment"] == "test"
    assert resource["gradtel.run_id"] == "otlp-run"
    points = {}
    for scope in request.resource_metrics[0].scope_metrics:
        for metric in scope.metrics:
            data = metric.sum if metric.HasField("sum") else metric.gauge
            for p in data.data_points:
                attrs = {a.key: a.value.string_value for a in p.attributes}
                value = p.as_double if p.HasField("as_double") else p.as_int
                points[(metric.name, attrs.get("variable"))] = value
    assert points[("gradtel_steps", None)] == 5
    assert points[("gradtel_gradient_missing", "cut")] == 5
    assert points[("gradtel_gradient_norm", "w")] == pytest.approx(5.0)


@pytest.mark.slow
def test_console_exporter_prints_the_metrics():
    result = run_script(TRAIN + "export.shutdown()\n", {"OTEL_METRICS_EXPORTER": "console"})
    assert result.returncode == 0, result.stderr
    assert '"name": "gradtel_gradient_missing"' in result.stdout


@pytest.mark.slow
def test_the_applications_global_meter_provider_is_used():
    code = (
        textwrap.dedent("""
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    """)
        + TRAIN
        + textwrap.dedent("""
        import json
        out = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        out[m.name + "/" + str(p.attributes.get("variable"))] = p.value
        print(json.dumps(out))
    """)
    )
    result = run_script(code, {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "1"})
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert values["gradtel_gradient_missing/cut"] == 5
    assert values["gradtel_steps/None"] == 5
    assert "cannot serve metrics" not in result.stderr  # no endpoint of gradtel's own was attempted
    assert not math.isnan(values["gradtel_gradient_norm/w"])


def test_nonfinite_gradients_leave_their_gauges_out_and_the_global_norm_finite(exporter, caplog):
    good, bad = keras.Variable(np.zeros(2, "float32"), name="good"), keras.Variable(np.zeros(2, "float32"), name="bad")
    opt = keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="storm")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            opt.apply_gradients([(tf.constant([3.0, 4.0]), good), (tf.constant([np.nan, 1.0]), bad)])
        metrics = scrape(exporter.endpoint[1])
    base = {"run": "test-run", "optimizer": "storm"}
    assert sample(metrics["gradtel_gradient_global_norm"], **base) == pytest.approx(5.0)
    assert sample(metrics["gradtel_gradient_nonfinite"], variable="bad", **base) == 2
    assert not [s for s in metrics["gradtel_gradient_norm"] if s.labels.get("variable") == "bad"]
    assert sample(metrics["gradtel_gradient_norm"], variable="good", **base) == pytest.approx(5.0)
    assert not [r for r in caplog.records if "non-finite" in r.getMessage()]  # no SDK warning per collection
    gradtel.uninstrument(opt)


def test_a_histogram_under_gradtels_view_records_and_is_collected(exporter, caplog):
    """gradtel's view keeps no exemplars with a reservoir that, as the SDK requires, takes the parameters a
    histogram's reservoir is built with (it raised TypeError into the recording thread)."""
    histogram = exporter._owned_provider.get_meter(export.METER_NAME).create_histogram("gradtel_test_seconds")
    histogram.record(1.5)
    histogram.record(2.5)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        metrics = scrape(exporter.endpoint[1])
    assert "gradtel_test_seconds" not in metrics and "gradtel_process_start_time_seconds" in metrics
    assert [r.getMessage() for r in caplog.records if "gradtel_test_seconds" in r.getMessage()] == [
        "gradtel: metric 'gradtel_test_seconds' (Histogram) is not served on the Prometheus endpoint: only sums and "
        "gauges are."
    ]
