"""Library mode: gradtel on a MeterProvider it is given, starting nothing; its Prometheus reader as an SDK exporter;
every patch undone by ``uninstrument_all`` and the instrumentor."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader
from prometheus_client.parser import text_string_to_metric_families
from tensorflow.python.data.ops import structured_function
from tensorflow.python.eager import backprop, record
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import constant_op, ops
from tensorflow.python.ops import resource_variable_ops, script_ops

import gradtel
from gradtel import export, instrumenting, metrics, registry
from gradtel.export import SnapshotCache
from gradtel.series import SeriesPolicy
from tests.core.helpers import free_port, numpy_norm
from tests.core.test_layers import ROOT


def _points(reader: InMemoryMetricReader) -> dict[tuple[str, str | None, str | None], float]:
    """(metric, optimizer, variable) -> value of one collection."""
    found = {}
    for resource_metrics in reader.get_metrics_data().resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    attrs = point.attributes
                    found[(metric.name, attrs.get("optimizer"), attrs.get("variable"))] = point.value
    return found


def _step(optimizer, variables, grads):
    optimizer.apply_gradients(list(zip(grads, variables, strict=True)))


def test_a_given_meter_provider_gets_the_series_and_nothing_is_started(monkeypatch):
    export.shutdown()
    port = free_port()
    # What a self-started export would serve: it must not start.
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    w, cut = keras.Variable(np.zeros(2, "float32"), name="w"), keras.Variable(np.zeros(1, "float32"), name="cut")
    mine, other = keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0)
    gradtel.instrument(mine, name="library", meter_provider=provider)
    gradtel.instrument(other, name="elsewhere", start_exporter=False)
    try:
        assert export.current() is None
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
        g = tf.constant([3.0, 4.0])
        for _ in range(3):
            _step(mine, [w, cut], [g, None])
        _step(other, [w], [g])
        points = _points(reader)
        assert points[("gradtel_steps", "library", None)] == 3
        assert points[("gradtel_gradient_missing", "library", "cut")] == 3
        assert points[("gradtel_gradient_norm", "library", "w")] == pytest.approx(numpy_norm(g))
        assert not [key for key in points if key[1] == "elsewhere"]  # instrumented without this provider
        _step(mine, [w, cut], [g, None])
        again = _points(reader)  # a second collection of the same reader: a new snapshot
        assert again[("gradtel_steps", "library", None)] == 4
        assert again[("gradtel_gradient_missing", "library", "cut")] == 4
    finally:
        gradtel.uninstrument(mine)
        gradtel.uninstrument(other)
        provider.shutdown()


def test_the_snapshot_is_taken_per_collection_whatever_the_order_of_the_instruments():
    """gradtel's readers call ``refresh``; a foreign reader's collection is told by a metric asked for again."""
    cache = SnapshotCache(SeriesPolicy())
    first = cache.views(metrics.VARIABLES)  # not gradtel_steps first
    assert cache.views(metrics.STEPS) is first
    assert cache.views(metrics.MISSING) is first
    second = cache.views(metrics.VARIABLES)  # asked again: the next collection
    assert second is not first
    assert cache.views(metrics.STEPS) is second
    cache.refresh()
    assert cache.views(metrics.STEPS) is not second
    # A collection in another thread (a scrape during an OTLP push) takes its own and leaves this one's alone.
    mine = cache.views(metrics.GLOBAL_NORM)
    theirs = []
    other = threading.Thread(target=lambda: theirs.extend([cache.views(metrics.STEPS), cache.views(metrics.STEPS)]))
    other.start()
    other.join()
    assert theirs[0] is not mine and theirs[1] is not theirs[0]
    assert cache.views(metrics.MISSING) is mine


def test_the_gradtel_prometheus_exporter_serves_the_applications_provider(monkeypatch):
    port = free_port()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "gradtel_prometheus,otlp_proto_http")  # as the SDK is given it
    plugin = _entry_point("opentelemetry_metrics_exporter", "gradtel_prometheus")
    assert issubclass(plugin, MetricReader)  # the SDK calls a reader class as is, with no arguments
    reader = plugin()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    provider.get_meter("app").create_counter("app_requests").add(2)
    w = keras.Variable(np.zeros(2, "float32"), name="w")
    optimizer = keras.optimizers.SGD(0.0)
    gradtel.instrument(optimizer, name="plugged", meter_provider=provider)
    try:
        for _ in range(2):
            _step(optimizer, [w], [tf.constant([0.0, 2.0])])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples = {
            (s.name, s.labels.get("optimizer"), s.labels.get("variable")): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples[("gradtel_steps_total", "plugged", None)] == 2
        assert samples[("gradtel_gradient_norm", "plugged", "w")] == pytest.approx(2.0)
        assert samples[("app_requests_total", None, None)] == 2  # the application's own metrics too
    finally:
        gradtel.uninstrument(optimizer)
        provider.shutdown()
    with pytest.raises(urllib.error.URLError):  # the SDK's shutdown closed the endpoint
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def _entry_point(group: str, name: str):
    """The object pyproject.toml registers under ``group``/``name``, loaded as importlib.metadata would."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][group][name]
    module, _, attribute = declared.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _patched_by_the_diagnoser():
    """What the diagnoser patches (GradientTape, tf.data's function tracer, eager tensors and ops), as found now."""
    return {
        "GradientTape": {n: backprop.GradientTape.__dict__[n] for n in ("_push_tape", "_pop_tape", "gradient")},
        "tf.data": structured_function.StructuredFunctionWrapper.__dict__["__init__"],
        "tensor": {n: ops._EagerTensorBase.__dict__[n] for n in ("numpy", "__array__", "__float__", "__int__")},
        "record_operation": record.record_operation,
        "py_func_common": script_ops.py_func_common,
        "convert_to_eager_tensor": constant_op.convert_to_eager_tensor,
        "call_flat": atomic_function.AtomicFunction.call_flat,
        "fast_path_read": resource_variable_ops.BaseResourceVariable.__dict__.get("__getattribute__"),
    }


def test_uninstrument_all_undoes_every_patch():
    instrumenting.uninstrument_all()
    original = _patched_by_the_diagnoser()
    optimizer = keras.optimizers.SGD(0.1)
    gradtel.instrument(optimizer, name="undone", start_exporter=False)  # installs the diagnoser, armed
    assert registry.current_diagnoser() is not None and registry.current_diagnoser().recording
    patched = _patched_by_the_diagnoser()
    assert patched["GradientTape"]["gradient"] is not original["GradientTape"]["gradient"]  # the premise
    assert patched["fast_path_read"] is not None
    instrumenting.uninstrument_all()
    assert _patched_by_the_diagnoser() == original
    assert tf.GradientTape.gradient is original["GradientTape"]["gradient"]
    assert "apply" not in vars(optimizer)
    assert registry.current_diagnoser() is None
    # Training afterwards is plain TensorFlow, and instrumenting again installs a working diagnoser.
    v = keras.Variable(np.ones(2, "float32"), name="v")
    again = keras.optimizers.SGD(0.1)
    handle = gradtel.instrument(again, name="again", start_exporter=False)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(v * 2.0)
    again.apply_gradients([(tape.gradient(loss, v), v)])
    assert handle.totals()[0] == 1
    instrumenting.uninstrument_all()
    assert _patched_by_the_diagnoser() == original


def test_the_instrumentor_passes_its_meter_provider_and_undoes_every_patch():
    from gradtel.instrumentor import GradtelInstrumentor

    instrumenting.uninstrument_all()
    original = _patched_by_the_diagnoser()
    init = keras.optimizers.Optimizer.__mro__[1].__dict__["__init__"]  # keras's BaseOptimizer.__init__
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    instrumentor = GradtelInstrumentor()
    instrumentor.instrument(meter_provider=provider)
    try:
        optimizer = keras.optimizers.SGD(0.1, name="auto_sgd")
        assert gradtel.is_instrumented(optimizer)
        v = keras.Variable(np.ones(2, "float32"), name="v")
        optimizer.apply_gradients([(tf.constant([1.0, 1.0]), v)])
        assert _points(reader)[("gradtel_steps", "auto_sgd", None)] == 1
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    assert not gradtel.is_instrumented(optimizer)
    assert keras.optimizers.Optimizer.__mro__[1].__dict__["__init__"] is init
    assert _patched_by_the_diagnoser() == original


@pytest.mark.slow
def test_the_sdks_configuration_builds_the_provider_with_gradtel_prometheus(tmp_path):
    """What ``opentelemetry-instrument`` does with a distro (opentelemetry-distro's configurator is the SDK's,
    subclassed): the SDK looks ``gradtel_prometheus`` up among the installed ``opentelemetry_metrics_exporter``
    entry points, builds the global MeterProvider with it, and gradtel registers there, starting nothing."""
    port = free_port()
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        from opentelemetry.sdk._configuration import _OTelSDKConfigurator
        _OTelSDKConfigurator().configure()  # what a distro's configurator runs under opentelemetry-instrument
        import os, urllib.request
        import keras, numpy as np
        import gradtel
        from gradtel import export
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, epochs=2, verbose=0,
                  callbacks=[gradtel.keras.GradientTelemetry(name="configured")])
        print("OWN", export.current() is not None and export.current().endpoint is not None)
        port = os.environ["OTEL_EXPORTER_PROMETHEUS_PORT"]
        print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
    """)
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "OTEL_METRICS_EXPORTER": "gradtel_prometheus",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert "not found in entry point" not in result.stderr, "reinstall gradtel (pip install -e .): " + result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OWN False" in result.stdout  # no endpoint of gradtel's own: the SDK's provider serves
    samples = {
        (s.name, s.labels.get("optimizer")): s.value
        for family in text_string_to_metric_families(result.stdout.split("OWN False", 1)[1])
        for s in family.samples
    }
    assert samples[("gradtel_steps_total", "configured")] == 4


def test_the_keras_callback_takes_a_meter_provider():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    telemetry = gradtel.keras.GradientTelemetry(name="fit-library", meter_provider=provider)
    try:
        model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, epochs=2, verbose=0, callbacks=[telemetry])
        assert _points(reader)[("gradtel_steps", "fit-library", None)] == 4
    finally:
        instrumenting.uninstrument_all()
        provider.shutdown()
