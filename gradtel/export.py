"""Export through OpenTelemetry: a MeterProvider whose readers read gradtel's latest snapshot.

Configured from the standard OpenTelemetry environment (see :mod:`gradtel.config`). The data path runs one way:
at collection time (a Prometheus scrape, or the OTLP reader's timer) one snapshot per optimizer table is read and
turned into points (:class:`Sources`). The optimizer-level metrics are observable instruments; the per-variable
ones, the bulk of the series, reach gradtel's own readers through :mod:`gradtel.producer` (or, on a MeterProvider
gradtel does not own, through instruments too). Which handles are read comes from :mod:`gradtel.registry`: the
process's export reads those instrumented without a ``meter_provider``, a given provider (library mode,
:func:`bind`) those instrumented with it. Nothing here ever touches the training step, and any failure is logged
once and leaves training alone.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import ExemplarReservoir
from opentelemetry.sdk.metrics.export import MetricExporter

from gradtel import config as settings
from gradtel import identity, metrics, phases, registry, statistics
from gradtel.config import Config
from gradtel.exposition import cyclic_gc_paused
from gradtel.handle import Handle
from gradtel.logonce import LogOnce
from gradtel.producer import Point, ProducingPeriodicReader, VariableProducer
from gradtel.records import OptimizerSummary, VariableRecord, nonfinite_origins
from gradtel.series import Selection, SeriesPolicy
from gradtel.version import __version__
from gradtel.vocabulary import MissingCause

log = logging.getLogger("gradtel")

#: The instrumentation scope of gradtel's meter.
METER_NAME = "gradtel"


@dataclass(frozen=True)
class _OptimizerView:
    name: str
    summary: OptimizerSummary
    records: list[VariableRecord]  # every variable: gradtel_variables counts them all
    selected: Selection  # those with series of their own (cardinality control)


class SnapshotCache:
    """One read of the handles per collection, shared by all of gradtel's metrics so that they agree.

    gradtel's Prometheus reader takes the snapshot explicitly as each collection begins (``refresh``, passed to it
    as ``before_collect``). The SDK's readers (gradtel's periodic OTLP reader, whose ``collect`` is final, and any
    reader on the application's MeterProvider) give no such signal, but the SDK asks each instrument once per
    collection: a metric asked for again starts a new collection and
    takes a new snapshot, whichever instrument the SDK happens to call first. The snapshot is kept per thread: the
    SDK runs a reader's callbacks in the thread that collects, so two readers collecting at once (a scrape during
    an OTLP push) each see their own snapshot, and a collection never waits for another's export.
    """

    def __init__(self, policy: SeriesPolicy, meter_providers: Iterable[Any] = (None,)) -> None:
        self._policy = policy
        #: Whose handles are read: those instrumented with one of these providers (None: the process's export).
        self.meter_providers = list(meter_providers)
        self._local = threading.local()  # .views: the snapshot; .served: the metrics read from it
        self._log_once = LogOnce()

    def refresh(self) -> None:
        """Take a new snapshot in this thread: a collection begins."""
        self._take()

    def views(self, metric: metrics.Metric) -> list[_OptimizerView]:
        """This thread's current snapshot, for ``metric``; a new one if ``metric`` was already read from it."""
        views: list[_OptimizerView] | None = getattr(self._local, "views", None)
        if views is None or metric in self._local.served:
            views = self._take()
        self._local.served.add(metric)
        return views

    def _take(self) -> list[_OptimizerView]:
        active = registry.handles(active_only=True, meter_providers=self.meter_providers)
        # Paused: decoding the tables makes tens of thousands of short-lived objects (see cyclic_gc_paused).
        with cyclic_gc_paused():
            self._local.views = views = [self._read(h) for h in active]
        self._local.served = set()
        return views

    def _read(self, handle: Handle) -> _OptimizerView:
        try:
            summary, records = handle.read()
            return _OptimizerView(handle.name, summary, records, self._policy.select(records))
        except Exception:
            self._log_once(
                log,
                logging.WARNING,
                "gradtel: reading the statistics of %r failed; its series are skipped.",
                handle.name,
                exc_info=True,
            )
            return _OptimizerView(handle.name, OptimizerSummary(0, float("nan"), 0), [], Selection([], []))


#: Metrics with a series per variable (or layer roll-up): the bulk of the series, which gradtel's own readers take
#: from :class:`gradtel.producer.VariableProducer` instead of the SDK's instruments.
PER_VARIABLE: tuple[metrics.Metric, ...] = tuple(s.metric for s in statistics.STATISTICS if s.metric is not None)


class Sources:
    """What gradtel exports, metric by metric, as (value, attributes) pairs read from the snapshot cache.

    The one home of which series exist and what they carry; the SDK's instruments (:class:`Instruments`) and the
    producer (:mod:`gradtel.producer`) only wrap these pairs in their own types.
    """

    def __init__(self, config: Config, cache: SnapshotCache) -> None:
        self._common = {"run": config.run_id, "worker": config.worker.label}
        self.cache = cache
        # Bounded by the series ever exported (variables, layer roll-ups, causes): what Prometheus holds too.
        self._attrs_cache: dict[tuple[str, ...], dict[str, str]] = {}
        self._selected: dict[str, tuple[list[VariableRecord] | None, list[dict[str, str]]]] = {}
        self._by_metric = {
            metrics.STEPS: self._steps,
            # the per-variable statistics' metrics (gradtel/statistics.py); the missing counter has its own labels
            **{s.metric: self._per_variable(s.metric, s.field) for s in statistics.STATISTICS if s.metric is not None},
            metrics.MISSING: self._missing,
            metrics.GLOBAL_NORM: self._global_norm,
            metrics.VARIABLES: self._variables,
            metrics.SKIPPED: self._skipped,
            metrics.PROCESS_START: self._process_start,
            metrics.PHASE: self._phase,
            metrics.NONFINITE_ORIGIN: self._nonfinite_origin,
        }
        self._process = {"run": config.run_id, "worker": config.worker.label}
        self._phase_attrs = {name: {**self._process, "phase": name} for name in metrics.PHASES}

    def of(self, metric: metrics.Metric) -> Callable[[], Iterable[Point]]:
        """The points of ``metric`` in the current snapshot (see :class:`SnapshotCache`: one collection is one
        snapshot)."""
        return self._by_metric[metric]

    def _attrs(self, optimizer: str, *pairs: str) -> dict[str, str]:
        """The attribute dict of one series (``pairs``: key, value, key, value...), built once: a series keeps its
        labels for the whole run, and building 40,000 dicts per collection is a measurable share of the export."""
        key = (optimizer, *pairs)
        attrs = self._attrs_cache.get(key)
        if attrs is None:
            attrs = self._attrs_cache[key] = {
                **self._common,
                "optimizer": optimizer,
                **dict(zip(pairs[::2], pairs[1::2], strict=True)),
            }
        return attrs

    def _variable_attrs(self, record: VariableRecord, *pairs: str) -> dict[str, str]:
        return self._attrs(record.optimizer, "variable", record.name, "layer", record.layer, *pairs)

    def _steps(self) -> Iterable[Point]:
        for view in self.cache.views(metrics.STEPS):
            yield view.summary.steps, self._attrs(view.name)

    def _skipped(self) -> Iterable[Point]:
        for view in self.cache.views(metrics.SKIPPED):
            yield view.summary.skipped_steps, self._attrs(view.name)

    def _process_start(self) -> Iterable[Point]:
        yield identity.START_TIME_S, self._process

    def _phase(self) -> Iterable[Point]:
        now = phases.current()
        if now is not None:  # nothing declared a phase: no series (the rules then count the process as training)
            for name, attrs in self._phase_attrs.items():
                yield int(name == now), attrs

    def _global_norm(self) -> Iterable[Point]:
        for view in self.cache.views(metrics.GLOBAL_NORM):
            if view.summary.steps and math.isfinite(view.summary.global_norm):
                yield view.summary.global_norm, self._attrs(view.name)

    def _nonfinite_origin(self) -> Iterable[Point]:
        # Whatever the series policy: the variables where a NaN began are few, and they are what the alert names.
        for view in self.cache.views(metrics.NONFINITE_ORIGIN):
            for step, origin in nonfinite_origins(view.records).values():
                for record in origin:
                    yield step, self._variable_attrs(record)

    def _variables(self) -> Iterable[Point]:
        for view in self.cache.views(metrics.VARIABLES):
            counts: dict[str, int] = dict.fromkeys(metrics.STATES, 0)
            for record in view.records:
                counts[record.state] += 1
            for state, count in counts.items():
                yield count, self._attrs(view.name, "state", str(state))

    def _missing(self) -> Iterable[Point]:
        # A variable gets a missing series once it has been missing; 'cause' is bounded (vocabulary.py names).
        for view in self.cache.views(metrics.MISSING):
            for record in view.selected.missing:
                if record.missing_steps:
                    cause = str(getattr(record.missing_cause, "category", MissingCause.UNKNOWN))  # a plain str label
                    expected = "true" if record.expected_missing else "false"
                    yield record.missing_steps, self._variable_attrs(record, "cause", cause, "expected", expected)

    def _per_variable(self, metric: metrics.Metric, field: str) -> Callable[[], Iterable[Point]]:
        # OpenTelemetry drops (and logs, every collection) non-finite observations: a gauge of a missing or
        # non-finite gradient is left out instead; the counters and gradtel_variables say which state it is in.
        def points() -> Iterable[Point]:
            for view in self.cache.views(metric):
                for record, attrs in zip(view.selected.records, self._selected_attrs(view), strict=True):
                    value = getattr(record, field)
                    if math.isfinite(value):
                        yield value, attrs

        return points

    def _selected_attrs(self, view: _OptimizerView) -> list[dict[str, str]]:
        """The attributes of ``view``'s selected records, looked up once per snapshot for the four per-variable
        metrics that share them (kept per optimizer: bounded by the optimizers)."""
        records, attrs = self._selected.get(view.name, (None, []))
        if records is not view.selected.records:
            records, attrs = view.selected.records, [self._variable_attrs(r) for r in view.selected.records]
            self._selected[view.name] = (records, attrs)
        return attrs


class Instruments:
    """Observable instruments on one meter for ``chosen`` metrics; each callback observes its :class:`Sources`."""

    def __init__(self, meter: otel_metrics.Meter, sources: Sources, chosen: Iterable[metrics.Metric]) -> None:
        self._log_once = LogOnce()
        for metric in sorted(chosen, key=metrics.ALL.index):  # the table's order (the snapshot does not depend on it)
            create = (
                meter.create_observable_counter
                if metric.kind is metrics.Kind.COUNTER
                else meter.create_observable_gauge
            )
            create(
                metric.otel_name,
                callbacks=[self._guarded(sources.of(metric))],
                unit=metric.unit,
                description=metric.description,
            )

    def _guarded(self, points: Callable[[], Iterable[Point]]) -> Any:
        def safe(options: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(value, attrs) for value, attrs in points()]
            except Exception:
                self._log_once(
                    log,
                    logging.WARNING,
                    "gradtel: an export callback failed; collections skip it (logged once).",
                    exc_info=True,
                )
                return []

        return safe


class Exporter:
    """The process's export: the MeterProvider (gradtel's own, or the application's), readers and endpoint.

    It exports the handles instrumented without a ``meter_provider``.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.endpoint: tuple[str, int] | None = None
        self.prometheus_reader: Any = None  # exposition.PrometheusReader when the pull endpoint is configured
        self._owned_provider: Any = None
        self._server: Any = None
        self.producer: VariableProducer | None = None
        if global_provider_is_set():
            log.info("gradtel: using the application's global MeterProvider (its views and limits apply).")
            self.cache = _bind(otel_metrics.get_meter_provider(), None, config)
            return
        # gradtel's own readers: the per-variable series skip the SDK's per-series work (see producer.py)
        self.cache = SnapshotCache(config.series)
        sources = Sources(config, self.cache)
        self.producer = VariableProducer({m: sources.of(m) for m in PER_VARIABLE}, METER_NAME, config.max_series)
        self._owned_provider = self._build_provider()
        through_sdk = tuple(m for m in metrics.ALL if m not in PER_VARIABLE)
        Instruments(self._owned_provider.get_meter(METER_NAME, __version__), sources, through_sdk)

    def _build_provider(self) -> Any:
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
        from opentelemetry.sdk.metrics.view import View

        readers = [r for r in (self._reader(kind) for kind in self.config.exporters) if r is not None]
        # No exemplars: observable callbacks run at collection time, outside any span, so there is never one to
        # keep, yet the SDK's default reservoir locks, sorts and lists per series per collection (~15% of it).
        limit: dict[str, Any] = (
            {"aggregation_cardinality_limit": self.config.max_series} if _view_takes_limit(View) else {}
        )
        view = View(instrument_name="gradtel*", exemplar_reservoir_factory=lambda aggregation: _NoExemplars, **limit)
        # shutdown_on_exit=False: gradtel shuts it down itself (runner, export.shutdown), once.
        return MeterProvider(
            metric_readers=readers,
            resource=self.config.resource(),
            views=[view],
            exemplar_filter=AlwaysOffExemplarFilter(),
            shutdown_on_exit=False,
        )

    def _reader(self, kind: str) -> Any:
        """The reader of one exporter, or None (and one warning line) when it cannot be made: the others run."""
        try:
            if kind == "prometheus":
                return self._prometheus_reader()
            if kind == "otlp":
                return self._periodic_reader(_otlp_exporter(self.config.otlp_protocol))
            if kind == "console":
                from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

                return self._periodic_reader(ConsoleMetricExporter())
        except _Unavailable as error:
            log.warning("gradtel: %s", error)
        return None

    def _periodic_reader(self, exporter: Any) -> Any:
        assert self.producer is not None  # gradtel's own readers are made only with gradtel's own provider
        return ProducingPeriodicReader(
            exporter, self.producer, self.config.export_interval_ms, self.config.export_timeout_ms
        )

    def _prometheus_reader(self) -> Any:
        from gradtel.endpoint import Endpoint, EndpointError, security
        from gradtel.exposition import PrometheusReader

        host, port = self.config.prometheus_host, self.config.prometheus_port
        reader = PrometheusReader(
            self.config.prometheus_min_interval_s,
            self.config.prometheus_cpu_share,
            self.producer,
            before_collect=self.cache.refresh,
        )
        try:
            self._server = Endpoint(reader.exposition, host, port, security(self.config))
        except EndpointError as error:
            raise _Unavailable(f"{error}; training goes on without this endpoint.") from None
        self.prometheus_reader = reader
        self.endpoint = (host, self._server.port)
        log.info("gradtel: serving metrics on %s://%s:%d/metrics", self._server.scheme, host, self._server.port)
        return reader

    def force_flush(self, timeout_s: float = 5.0) -> None:
        if self._owned_provider is not None:
            self._owned_provider.force_flush(int(timeout_s * 1000))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Final flush and stop: the OTLP readers push once more; the endpoint closes."""
        if self._owned_provider is not None:
            self._owned_provider.shutdown(int(timeout_s * 1000))
        if self._server is not None:
            self._server.close()


class _NoExemplars(ExemplarReservoir):
    """An exemplar reservoir that keeps nothing (see ``Exporter._build_provider``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Takes and ignores the aggregation's parameters: the SDK builds a histogram's reservoir with keywords
        (``boundaries``, ``size``), which every reservoir must accept, and types the builder as taking a dict."""
        super().__init__()

    def offer(self, value: Any, time_unix_nano: int, attributes: Any, context: Any) -> None:
        pass

    def collect(self, point_attributes: Any) -> list[Any]:
        return []


def _view_takes_limit(view: type) -> bool:
    """Whether the SDK's ``View`` takes ``aggregation_cardinality_limit`` (opentelemetry-sdk 1.45 and later).

    Older SDKs fold no series at all, so leaving the keyword out keeps every series there; gradtel's own
    per-variable series are limited by the producer either way. Passing it blindly would be a ``TypeError``
    that disables the whole export.
    """
    return "aggregation_cardinality_limit" in inspect.signature(view).parameters


class _Unavailable(Exception):
    """An exporter that cannot run here (its package is missing, its port cannot be bound): one line, and the
    other exporters go on."""


def _otlp_exporter(protocol: str) -> MetricExporter:
    exporter: type[MetricExporter]
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

            exporter = GrpcExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

            exporter = HttpExporter
    except ImportError as error:
        raise _Unavailable(
            f"OTEL_METRICS_EXPORTER=otlp ({protocol}) needs the OTLP exporter, which cannot be "
            f"imported ({error}): pip install 'gradtel[otlp]'; the OTLP push is off."
        ) from None
    return exporter()


def global_provider_is_set() -> bool:
    """Whether the application has set a global MeterProvider.

    Until it does, the OpenTelemetry API hands out a placeholder of its own (a proxy, or its no-op provider); any
    other provider comes from an SDK. Told by the class's package, not by a private class name.
    """
    return not type(otel_metrics.get_meter_provider()).__module__.startswith("opentelemetry.metrics")


_lock = threading.RLock()
_exporter: Exporter | None = None
_failed = False
#: Library mode: gradtel's instruments per MeterProvider (by identity: it holds them), and the snapshot cache whose
#: ``meter_providers`` say whose handles they export. One set of instruments per provider: two would collide.
_bound: dict[int, tuple[Any, SnapshotCache]] = {}
_bind_failed = False


def bind(meter_provider: Any) -> None:
    """Library mode: export the handles instrumented with ``meter_provider`` through gradtel's instruments on it
    (registered once per provider). Starts nothing: the provider's readers collect. Never raises."""
    global _bind_failed
    try:
        _bind(meter_provider, meter_provider, None)
    except Exception:
        if not _bind_failed:
            _bind_failed = True
            log.warning(
                "gradtel: registering gradtel's instruments on the given MeterProvider failed; those "
                "optimizers are not exported (logged once).",
                exc_info=True,
            )


def _bind(meter_provider: Any, destination: Any, config: Config | None) -> SnapshotCache:
    """gradtel's instruments on ``meter_provider`` (made once), now also exporting the handles instrumented with
    ``destination`` (None: the process's export)."""
    with _lock:
        found = _bound.get(id(meter_provider))
        if found is None:
            # The exporter names do not concern a provider gradtel does not own: only the labels and series do.
            config = config or settings.load({**os.environ, "OTEL_METRICS_EXPORTER": "none"})
            cache = SnapshotCache(config.series, ())
            meter = meter_provider.get_meter(METER_NAME, __version__)
            Instruments(meter, Sources(config, cache), metrics.ALL)  # a provider gradtel does not own: all via the SDK
            found = _bound[id(meter_provider)] = (meter_provider, cache)
        cache = found[1]
        if not any(d is destination for d in cache.meter_providers):
            cache.meter_providers.append(destination)
        return cache


def ensure_started(config: Config | None = None) -> Exporter | None:
    """Set up the process's export once (idempotent): on the application's global MeterProvider if it has set one
    (nothing is started), else gradtel's own from ``config`` (the environment by default). Returns None when
    disabled or when it failed."""
    global _exporter, _failed
    with _lock:
        if _exporter is not None or _failed:
            return _exporter
        try:
            config = config or settings.load()
            if not config.exporters and not global_provider_is_set():  # the application's provider is its own
                return None
            _exporter = Exporter(config)
            atexit.register(shutdown)  # the final OTLP push at exit, once (gradtel run calls it earlier)
        except Exception:
            _failed = True
            log.warning("gradtel: starting the metrics export failed; training goes on without it.", exc_info=True)
        return _exporter


def current() -> Exporter | None:
    return _exporter


def shutdown() -> None:
    """Flush and stop the export (called at process exit by ``gradtel run`` and by tests)."""
    global _exporter, _failed
    with _lock:
        exporter, _exporter, _failed = _exporter, None, False
    if exporter is not None:
        exporter.shutdown()
