"""The Prometheus pull path: an OpenTelemetry ``MetricReader`` that renders the text exposition itself.

Why not opentelemetry-exporter-prometheus: it hands every data point to prometheus_client, which re-validates and
re-escapes every label of every series on every scrape (about 50 us per series, measured: 2 s for a 10,000-variable
model's 40,000 series, under the GIL, while training waits for it). gradtel's series keep their label sets for the
whole run, so this reader renders each label set once and, per collection, only formats the numbers.

Why collections are spaced: even with the per-variable series built as finished points (:mod:`gradtel.producer`),
a collection costs a few microseconds per series, a quarter of a second for a 10,000-variable model exported
variable by variable, under the GIL. So collections are
spaced to stay within a CPU share (see ``PrometheusReader``); scrapes in between are served the last collection
(rendered and, when asked for, gzipped once), so a scraper polling every second costs training no more than that
share. ``force_flush`` (the report, the final flush) always collects afresh.

The output follows the OpenTelemetry-to-Prometheus conventions of the official exporter (``_total`` on monotonic
sums, ``otel_scope_*`` labels, ``target_info`` from the resource), which the tests check series by series against
that exporter.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import logging
import math
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    Sum,
)

from gradtel.logonce import LogOnce

if TYPE_CHECKING:
    from gradtel.producer import VariableProducer

log = logging.getLogger("gradtel")

#: The text exposition format Prometheus reads (OpenMetrics is optional for it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")

#: The attributes of a point that has none (the SDK's type allows None; its aggregations give a dict).
_NO_ATTRIBUTES: Mapping[str, Any] = {}


@dataclass
class Exposition:
    """One rendered collection; the gzipped form is made on first request and kept."""

    text: bytes
    _gzipped: bytes | None = field(default=None, repr=False)

    def gzipped(self) -> bytes:
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.text, compresslevel=1)  # ~5x smaller; level 9 costs ~10x the CPU
        return self._gzipped


_EMPTY = Exposition(b"")


def _label_name(key: str) -> str:
    """Prometheus label name rules, [a-zA-Z_][a-zA-Z0-9_]*, applied as the OpenTelemetry exporter does (a leading
    digit becomes ``_``)."""
    if key[:1].isdigit():
        key = "_" + key[1:]
    return _INVALID_LABEL_CHARS.sub("_", key)


def _label_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)  # as the OpenTelemetry exporter
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: list[tuple[str, Any]]) -> str:
    return "{" + ",".join(f'{_label_name(k)}="{_label_value(v)}"' for k, v in pairs) + "}"


def _value(number: float | int) -> str:
    number = float(number)
    if math.isfinite(number):
        return repr(number)
    return "NaN" if math.isnan(number) else ("+Inf" if number > 0 else "-Inf")


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Renderer:
    """MetricsData -> text exposition. Label strings are cached per data-point attribute set.

    The SDK keeps one attributes mapping per series for the series' lifetime (and so does gradtel's producer), so
    the cache is keyed by family, scope and that mapping's identity (checked with ``is``, never trusted on id
    alone) and rebuilt from the series seen in each collection: it holds exactly the live series, never more.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[Any, dict[int, tuple[Any, str]]]] = {}
        self._log_once = LogOnce()  # once per metric name

    def render(self, data: MetricsData) -> bytes:
        families: dict[str, tuple[str, str, list[str]]] = {}
        cache: dict[tuple[str, int], tuple[Any, dict[int, tuple[Any, str]]]] = {}
        out: list[str] = []
        for resource_metrics in data.resource_metrics:
            attrs = sorted(resource_metrics.resource.attributes.items())
            if attrs:
                out += [
                    "# HELP target_info Target metadata\n",
                    "# TYPE target_info gauge\n",
                    f"target_info{_labels(attrs)} 1.0\n",
                ]
            for scope_metrics in resource_metrics.scope_metrics:
                scope = scope_metrics.scope
                scope_pairs = [
                    ("otel_scope_name", scope.name or ""),
                    ("otel_scope_version", scope.version or ""),
                    ("otel_scope_schema_url", scope.schema_url or ""),
                ]
                for metric in scope_metrics.metrics:
                    kind = self._kind(metric)
                    if kind is None:
                        continue
                    name = (
                        metric.name + "_total"
                        if kind == "counter" and not metric.name.endswith("_total")
                        else metric.name
                    )
                    _, _, lines = families.setdefault(name, (kind, metric.description or "", []))
                    key = (name, id(scope))
                    cached_scope, previous = self._cache.get(key, (None, {}))
                    if cached_scope is not scope:
                        previous = {}
                    _, prefixes = cache.setdefault(key, (scope, {}))
                    # _kind is None for every kind but sums and gauges, whose points are NumberDataPoints.
                    for point in cast("Sequence[NumberDataPoint]", metric.data.data_points):
                        attributes = point.attributes if point.attributes is not None else _NO_ATTRIBUTES
                        entry = previous.get(id(attributes))
                        if entry is None or entry[0] is not attributes:
                            entry = (attributes, name + _labels([*attributes.items(), *scope_pairs]) + " ")
                        prefixes[id(attributes)] = entry
                        lines.extend((entry[1], _value(point.value), "\n"))  # no copy of the label string
        self._cache = cache
        for name, (kind, description, lines) in families.items():
            out += [f"# HELP {name} {_help(description)}\n", f"# TYPE {name} {kind}\n", *lines]
        return "".join(out).encode()

    def _kind(self, metric: Any) -> str | None:
        """Prometheus type of an OpenTelemetry metric: monotonic cumulative sums are counters, the rest gauges."""
        data = metric.data
        if isinstance(data, Sum):
            monotonic = data.is_monotonic and data.aggregation_temporality is AggregationTemporality.CUMULATIVE
            return "counter" if monotonic else "gauge"
        if isinstance(data, Gauge):
            return "gauge"
        # gradtel's provider holds gradtel's instruments only, which are sums and gauges.
        self._log_once(
            log,
            logging.WARNING,
            "gradtel: metric %r (%s) is not served on the Prometheus endpoint: only sums and gauges are.",
            metric.name,
            type(data).__name__,
            key=metric.name,
        )
        return None


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector for one collection (when it was running).

    Why: a collection allocates tens of thousands of short-lived objects (points, label strings, records), all
    freed by reference counting when it ends. If the cyclic collector runs meanwhile, it promotes them to its
    oldest generation, and enough promotions set off a full collection of the training process's whole heap
    (over a million objects once TensorFlow is loaded: about a second on a 2-core machine, under the GIL).
    Paused, they never leave the youngest generation. Nothing is lost: any cycle is collected later as usual.
    Measured at 10,000 variables scraped every second: 7 full collections of ~1 s each during the run without
    the pause, none with it. An application that turns the collector off itself is left alone; one that turns it
    off during the collection's ~0.1 s finds it back on.
    """
    if not gc.isenabled():  # the application manages the collector itself: leave it alone
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class PrometheusReader(MetricReader):
    """A pull reader whose collections are spaced to keep their CPU cost within a share of one core.

    A scrape collects afresh when the next collection is due, else it gets the previous one. After a collection
    that took ``c`` CPU seconds, the next is due ``max(min_interval_s, c / cpu_share)`` seconds later: a small model
    (a few milliseconds per collection) is collected at every scrape up to once per ``min_interval_s``, while a
    10,000-variable model exported per variable (about 0.25 s per collection on a 2-core benchmark machine) is
    collected about once every 25 s at the default 1 %, however often it is scraped. CPU time of the
    collecting thread is what is measured, not wall time, which would count the time spent waiting for the
    training thread's GIL.
    """

    def __init__(
        self,
        min_interval_s: float,
        cpu_share: float,
        producer: VariableProducer | None = None,
        before_collect: Callable[[], None] | None = None,
        **reader_options: Any,
    ) -> None:
        """``before_collect`` runs as each collection begins (gradtel's exporter takes its snapshot there);
        ``reader_options`` go to the SDK's ``MetricReader`` (cumulative temporality by default: what Prometheus
        expects)."""
        super().__init__(**reader_options)
        self._producer = producer  # adds the per-variable series to each collection (see gradtel.producer)
        self._before_collect = before_collect
        self.min_interval_s = min_interval_s
        self.cpu_share = cpu_share
        self._typical_cost_s = 0.0  # median CPU seconds of the recent collections
        self._renderer = Renderer()
        self._latest = _EMPTY
        self._collected_at = float("-inf")
        self._lock = threading.Lock()  # one collection at a time; scrapes that arrive meanwhile share it
        self._log_once = LogOnce()
        self._collected_once = False
        self._costs: deque[float] = deque(maxlen=5)  # CPU seconds of the recent collections

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        if metrics_data is not None:
            if self._producer is not None:
                metrics_data = self._producer.merge(metrics_data, self)
            self._latest = Exposition(self._renderer.render(metrics_data))

    def exposition(self) -> Exposition:
        """The latest collection, collecting first when the next one is due."""
        with self._lock:
            if time.monotonic() >= self._collected_at + self.interval_s:
                started = time.thread_time()
                try:
                    with cyclic_gc_paused():
                        self._begin_collection()
                        self.collect()
                except Exception:  # serve the previous collection; scrapers see it age, training never notices
                    self._log_once(
                        log,
                        logging.WARNING,
                        "gradtel: a metrics collection failed; the endpoint serves the previous one (logged once).",
                        exc_info=True,
                    )
                self._space(time.thread_time() - started)
            return self._latest

    @property
    def interval_s(self) -> float:
        """The current spacing of collections (see the class docstring); follows changes of the settings."""
        return max(self.min_interval_s, self._typical_cost_s / self.cpu_share)

    def _space(self, cost_s: float) -> None:
        # The first collection is not typical (the SDK creates every aggregation, the renderer every label string),
        # and one collection can pay for a full garbage collection: space by the median of the recent ones.
        if self._collected_once:
            self._costs.append(cost_s)
            self._typical_cost_s = statistics.median(self._costs)
        self._collected_once = True
        self._collected_at = time.monotonic()
        if self.interval_s > 30:
            self._log_once(
                log,
                logging.WARNING,
                "gradtel: one metrics collection takes %.2f s of CPU, so the "
                "endpoint refreshes its values every %.0f s (GRADTEL_PROMETHEUS_CPU_SHARE=%g of a core). "
                "Fewer series (GRADTEL_VARIABLE_SERIES=auto/layer, GRADTEL_EXCLUDE) or a larger share "
                "refresh sooner.",
                self._typical_cost_s,
                self.interval_s,
                self.cpu_share,
            )

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Collect afresh now (the report, the final flush), whatever the spacing."""
        with self._lock:
            self._begin_collection()
            return super().force_flush(timeout_millis)

    def _begin_collection(self) -> None:
        if self._before_collect is not None:
            self._before_collect()

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Nothing to release: the endpoint that serves this reader is closed by the exporter."""
