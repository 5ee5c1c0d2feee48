"""The producer path (per-variable series handed to gradtel's readers as finished points) exports exactly what the
SDK's instruments export: the same series, values, kinds and temporality, overflow folding included."""

from __future__ import annotations

import gc
import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import View

import gradtel
from gradtel import metrics
from gradtel.config import Config
from gradtel.export import METER_NAME, PER_VARIABLE, Instruments, SnapshotCache, Sources, _view_takes_limit
from gradtel.producer import ProducingPeriodicReader, VariableProducer
from gradtel.series import SeriesPolicy


class Recorder(MetricExporter):
    """Keeps what it is given: each export's metrics as {(name, attributes): value} plus each metric's kind."""

    def __init__(self, delta: bool) -> None:
        temporality = AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
        super().__init__(preferred_temporality={ObservableCounter: temporality})
        self.exports: list[tuple[dict, dict]] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        points, kinds = {}, {}
        for resource_metrics in metrics_data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = metric.data
                    kinds[metric.name] = (
                        type(data).__name__,
                        getattr(data, "aggregation_temporality", None),
                        getattr(data, "is_monotonic", None),
                        scope_metrics.scope.name,
                    )
                    for point in data.data_points:
                        key = (metric.name, frozenset(point.attributes.items()))
                        assert key not in points, key
                        points[key] = point.value
        self.exports.append((points, kinds))
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


def _pipeline(producer_path: bool, delta: bool, limit: int):
    """One MeterProvider with gradtel's metrics: every metric through instruments, or the per-variable ones through
    the producer (as gradtel's own export builds it)."""
    config = Config(run_id="r", series=SeriesPolicy(mode="variable"), max_series=limit)
    sources = Sources(config, SnapshotCache(config.series))
    recorder = Recorder(delta)
    if producer_path:
        producer = VariableProducer({m: sources.of(m) for m in PER_VARIABLE}, METER_NAME, limit)
        reader = ProducingPeriodicReader(recorder, producer)
        chosen = [m for m in metrics.ALL if m not in PER_VARIABLE]
    else:
        reader, chosen = PeriodicExportingMetricReader(recorder), metrics.ALL
    provider = MeterProvider(
        metric_readers=[reader],
        shutdown_on_exit=False,
        # The SDK's own series limit exists from opentelemetry-sdk 1.45 (the test comparing with it needs it).
        views=[
            View(
                instrument_name="gradtel*",
                **({"aggregation_cardinality_limit": limit} if _view_takes_limit(View) else {}),
            )
        ],
    )
    Instruments(provider.get_meter(METER_NAME, "1"), sources, chosen)
    return provider, reader, recorder


@pytest.mark.parametrize("delta", [False, True], ids=["cumulative", "delta"])
@pytest.mark.parametrize("limit", [100_000, 2], ids=["unbounded", "overflowing"])
def test_the_producer_exports_what_the_sdk_instruments_export(delta, limit):
    names = ["a", "z", "gone", "bad", "b"]
    variables = [keras.Variable(np.zeros((3,), "float32"), name=n) for n in names]
    opt = keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="produced", max_abs=True)
    sdk_provider, sdk_reader, sdk = _pipeline(False, delta, limit)
    our_provider, our_reader, ours = _pipeline(True, delta, limit)
    try:
        for step in range(3):
            grads = [
                tf.constant([1.0, 2.0, 2.0 * step]),
                tf.zeros(3),
                None,
                tf.constant([np.nan if step % 2 else 1.0, 0.0, 0.0]),
                tf.fill([3], 0.5 + step),
            ]
            opt.apply_gradients(zip(grads, variables, strict=True))
            sdk_reader.collect()
            our_reader.collect()
        for (sdk_points, sdk_kinds), (our_points, our_kinds) in zip(sdk.exports, ours.exports, strict=True):
            assert our_kinds == sdk_kinds
            assert our_points.keys() == sdk_points.keys()
            for key, value in sdk_points.items():
                assert our_points[key] == pytest.approx(value), key
        points, kinds = ours.exports[-1]
        assert kinds["gradtel_gradient_zero"][:3] == (
            "Sum",
            AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE,
            True,
        )
        if limit == 2:
            folded = [k for k in points if k[0] == "gradtel_gradient_norm" and ("otel.metric.overflow", True) in k[1]]
            assert len(folded) == 1
        else:  # the values themselves, from the gradients: b's last norm, z's zero steps
            attrs = frozenset({"run": "r", "worker": "", "optimizer": "produced", "variable": "b", "layer": ""}.items())
            assert points[("gradtel_gradient_norm", attrs)] == pytest.approx(math.sqrt(3) * 2.5)
            zero = frozenset({**dict(attrs), "variable": "z"}.items())
            assert points[("gradtel_gradient_zero", zero)] == (1 if delta else 3)
    finally:
        gradtel.uninstrument(opt)
        sdk_provider.shutdown()
        our_provider.shutdown()


def test_a_failing_producer_leaves_the_other_metrics_and_logs_once_and_the_collector_as_found(caplog):
    variable = keras.Variable(np.zeros((2,), "float32"), name="v")
    opt = keras.optimizers.SGD(0.0)
    gradtel.instrument(opt, name="failing")
    config = Config(run_id="r")
    sources = Sources(config, SnapshotCache(config.series))

    collector_running = []

    def broken():
        collector_running.append(gc.isenabled())
        raise RuntimeError("boom")

    recorder = Recorder(delta=False)
    producer = VariableProducer({metrics.NORM: broken}, METER_NAME, 100)
    reader = ProducingPeriodicReader(recorder, producer)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    Instruments(provider.get_meter(METER_NAME, "1"), sources, [metrics.STEPS])
    try:
        opt.apply_gradients([(tf.ones(2), variable)])
        with caplog.at_level(logging.WARNING, logger="gradtel"):
            reader.collect()
            reader.collect()
        assert set(recorder.exports[-1][1]) == {"gradtel_steps"}
        assert collector_running == [False, False] and gc.isenabled()  # collections run with it paused
        assert [r.message for r in caplog.records if "per-variable series failed" in r.message] == [
            "gradtel: producing the per-variable series failed; collections leave them out (logged once)."
        ]
    finally:
        gradtel.uninstrument(opt)
        provider.shutdown()


def test_the_periodic_reader_reads_the_snapshot_with_the_collector_paused_and_leaves_it_running(monkeypatch):
    """Decoding the tables makes most of a collection's short-lived objects: the periodic reader (whose SDK
    ``collect`` is final, so not wrapped) reads them with the cyclic collector paused."""
    variable = keras.Variable(np.zeros((2,), "float32"), name="v")
    opt = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(opt, name="paused")
    read, collector_running = handle.read, []

    def observed_read():
        collector_running.append(gc.isenabled())
        return read()

    monkeypatch.setattr(handle, "read", observed_read)
    provider, reader, recorder = _pipeline(True, delta=False, limit=100)
    try:
        opt.apply_gradients([(tf.ones(2), variable)])
        reader.collect()
        assert collector_running == [False] and gc.isenabled()
        points, _ = recorder.exports[-1]
        attrs = {"run": "r", "worker": "", "optimizer": "paused"}
        assert points[("gradtel_steps", frozenset(attrs.items()))] == 1
        norm = frozenset({**attrs, "variable": "v", "layer": ""}.items())
        assert points[("gradtel_gradient_norm", norm)] == pytest.approx(math.sqrt(2))
    finally:
        gradtel.uninstrument(opt)
        provider.shutdown()
