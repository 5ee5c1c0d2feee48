"""Per-variable series handed to gradtel's own readers as finished OpenTelemetry points: the path for large models.

Why: through the SDK's observable instruments every series costs about 25 us per collection (a ``Measurement``,
attribute cleaning and hashing, an aggregation under a lock): ~0.75 s for a 10,000-variable model exported per
variable (30,000 series) on a 2-core machine, under the GIL, while training waits. gradtel's snapshot is already
aggregated (cumulative counts, last values), which is what the OpenTelemetry specification's MetricProducer is for:
a bridge that hands a reader the finished points of another source. The Python SDK has no MetricProducer interface
yet, so gradtel's readers (its Prometheus reader, and its periodic reader for OTLP and the console) merge this
producer's metrics into each collection of gradtel's meter; the points then go through the same OpenTelemetry
data model, readers and exporters as the rest. Its cost is one ``NumberDataPoint`` per series (~2 us).

The SDK's semantics are kept: cumulative counters (deltas for a reader that prefers them), gauges left out while
not finite, at most ``max_series`` series per metric with the rest folded into one ``otel.metric.overflow``
series. With the application's own MeterProvider, whose readers gradtel does not own, the per-variable metrics go
through the SDK's instruments like the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    MetricExporter,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Metric as OtelMetric

from gradtel import metrics
from gradtel.exposition import cyclic_gc_paused
from gradtel.logonce import LogOnce

log = logging.getLogger("gradtel")

#: The attributes of the series that holds what is past the cardinality limit (as the SDK names it).
_OVERFLOW: dict[str, Any] = {"otel.metric.overflow": True}

#: One series: its value and its attributes (one dict per series for the whole run, see export.Sources).
Point = tuple[float, dict[str, str]]
Points = Callable[[], Iterable[Point]]


class VariableProducer:
    """Builds the per-variable metrics of one collection and adds them to gradtel's scope in a reader's data."""

    def __init__(self, points: Mapping[metrics.Metric, Points], scope_name: str, max_series: int) -> None:
        self._points = points
        self._scope_name = scope_name
        self._max_series = max_series
        self._started_ns = time.time_ns()  # cumulative counters count from the export's start
        # Per delta-preferring reader: its previous collection's time and counter values by metric and series (the
        # attribute dicts live as long as their series, see export.Sources), bounded by the series ever exported.
        self._previous: dict[int, tuple[int, dict[str, dict[int, float]]]] = {}
        self._log_once = LogOnce()

    def merge(self, data: MetricsData, reader: MetricReader) -> MetricsData:
        """``data`` with the per-variable metrics appended to gradtel's scope. Never raises: a failure is logged
        once and the collection goes on without them."""
        try:
            return MetricsData(
                [
                    ResourceMetrics(
                        resource_metrics.resource,
                        [
                            self._extended(scope_metrics, reader)
                            if scope_metrics.scope.name == self._scope_name
                            else scope_metrics
                            for scope_metrics in resource_metrics.scope_metrics
                        ],
                        resource_metrics.schema_url,
                    )
                    for resource_metrics in data.resource_metrics
                ]
            )
        except Exception:
            self._log_once(
                log,
                logging.WARNING,
                "gradtel: producing the per-variable series failed; collections leave them out (logged once).",
                exc_info=True,
            )
            return data

    def _extended(self, scope_metrics: ScopeMetrics, reader: MetricReader) -> ScopeMetrics:
        # The counters' temporality is the one the reader gave gradtel's own counters in this very collection
        # (gradtel_steps is always among them): cumulative unless its exporter prefers deltas.
        delta = any(
            isinstance(m.data, Sum) and m.data.aggregation_temporality is AggregationTemporality.DELTA
            for m in scope_metrics.metrics
        )
        produced = self._produce(id(reader), delta)
        return ScopeMetrics(scope_metrics.scope, [*scope_metrics.metrics, *produced], scope_metrics.schema_url)

    def _produce(self, reader_id: int, delta: bool) -> list[OtelMetric]:
        now = time.time_ns()
        since, previous = self._previous.get(reader_id, (self._started_ns, {})) if delta else (self._started_ns, {})
        current: dict[str, dict[int, float]] = {}
        produced = []
        for metric, points in self._points.items():
            counter = metric.kind is metrics.Kind.COUNTER
            pairs = self._bounded(metric, list(points()), counter)
            if not pairs:
                continue  # as the SDK: a metric without points is left out
            if not counter:
                data: Sum | Gauge = Gauge(
                    [NumberDataPoint(attrs, self._started_ns, now, value, []) for value, attrs in pairs]
                )
            elif delta:  # metrics share attribute dicts: the previous values are kept per metric
                last = previous.get(metric.name, {})
                current[metric.name] = {id(attrs): value for value, attrs in pairs}
                data = Sum(
                    [NumberDataPoint(attrs, since, now, value - last.get(id(attrs), 0), []) for value, attrs in pairs],
                    AggregationTemporality.DELTA,
                    True,
                )
            else:
                data = Sum(
                    [NumberDataPoint(attrs, self._started_ns, now, value, []) for value, attrs in pairs],
                    AggregationTemporality.CUMULATIVE,
                    True,
                )
            produced.append(OtelMetric(metric.otel_name, metric.description, metric.unit, data))
        if delta:
            self._previous[reader_id] = (now, current)
        return produced

    def _bounded(self, metric: metrics.Metric, pairs: list[Point], counter: bool) -> list[tuple[float, dict[str, Any]]]:
        """At most ``max_series`` series, then one overflow series: the sum of the rest for a counter, the last
        value for a gauge (the SDK's aggregations of the same)."""
        if len(pairs) <= self._max_series:
            return pairs
        self._log_once(
            log,
            logging.WARNING,
            "gradtel: %s has %d series, more than GRADTEL_MAX_SERIES=%d; the rest "
            'are folded into one series labelled otel_metric_overflow="true" (logged once).',
            metric.name,
            len(pairs),
            self._max_series,
        )
        rest = pairs[self._max_series :]
        folded = sum(value for value, _ in rest) if counter else rest[-1][0]
        return [*pairs[: self._max_series], (folded, _OVERFLOW)]


class ProducingPeriodicReader(PeriodicExportingMetricReader):
    """The SDK's periodic reader (OTLP, console) with the producer's metrics in every export.

    Python's cyclic collector is paused (see ``exposition.cyclic_gc_paused``) where gradtel allocates: the
    snapshot's read (``export.SnapshotCache``) and, here, the producer's points and their export. The SDK's
    ``collect``, which runs the callbacks and then this reader's ``_receive_metrics``, is final: not overridden, so
    this reader cannot announce a collection; the snapshot cache tells one from the instruments asking again (see
    ``export.SnapshotCache``), and the producer's points come from the snapshot the callbacks just took.
    """

    def __init__(
        self,
        exporter: MetricExporter,
        producer: VariableProducer,
        interval_ms: float | None = None,
        timeout_ms: float | None = None,
    ) -> None:
        """``interval_ms``/``timeout_ms``: None reads OTEL_METRIC_EXPORT_INTERVAL/_TIMEOUT as the SDK does;
        gradtel passes the values its configuration checked."""
        self._producer = producer  # set first: the reader's thread may collect before __init__ returns
        super().__init__(exporter, export_interval_millis=interval_ms, export_timeout_millis=timeout_ms)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        with cyclic_gc_paused():  # see there: a collection's garbage must not set off full collections
            super()._receive_metrics(self._producer.merge(metrics_data, self), timeout_millis, **kwargs)
