"""gradtel's Prometheus reader: the same series as the official OpenTelemetry exporter, collections spaced by their
CPU cost, and the HTTP details a scraper relies on (gzip, HEAD, content type)."""

from __future__ import annotations

import gc
import gzip
import logging
import time
import urllib.request

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradtel.endpoint import Endpoint, Security
from gradtel.exposition import CONTENT_TYPE, PrometheusReader, cyclic_gc_paused

ODD_VALUES = ["plain", 'with "quotes"', "back\\slash", "new\nline", "ünïcødé ∇", "", "a,b=c}"]


def families(text: str) -> dict[str, tuple[str, str, set]]:
    """name -> (type, help, {(sample name, labels, value)}), as prometheus_client's parser reads the text."""
    return {
        f.name: (f.type, f.documentation, {(s.name, frozenset(s.labels.items()), s.value) for s in f.samples})
        for f in text_string_to_metric_families(text)
    }


@pytest.fixture
def provider():
    """One MeterProvider read by gradtel's reader and by the official exporter at the same time."""
    ours = PrometheusReader(min_interval_s=0.0, cpu_share=1.0)
    registry = CollectorRegistry(auto_describe=True)
    official = PrometheusMetricReader(registry=registry)
    resource = Resource({"service.name": "svc", "gradtel.run_id": "r-1", "process.pid": 42, "9lives": "x"})
    mp = MeterProvider(metric_readers=[ours, official], resource=resource)
    yield mp, ours, registry
    mp.shutdown()


def test_series_equal_the_official_exporters_series_by_series(provider):
    mp, ours, registry = provider
    meter = mp.get_meter("gradtel", "9.9.9")
    steps = {"n": 0}

    def counter(options: CallbackOptions):
        return [Observation(steps["n"] * (i + 1), {"variable": v, "layer": "l"}) for i, v in enumerate(ODD_VALUES)]

    def gauge(options: CallbackOptions):
        return [
            Observation(0.1 * (i + 1) - 1e-300, {"variable": v, "n": i, "flag": i % 2 == 0, "x": 1.5})
            for i, v in enumerate(ODD_VALUES)
        ]

    meter.create_observable_counter("gradtel_things", callbacks=[counter], description='Things\\ "counted"\nhere.')
    meter.create_observable_gauge("gradtel_level", callbacks=[gauge], description="A level.")
    updown = meter.create_up_down_counter("gradtel_balance", description="Goes both ways.")
    updown.add(5, {"k": "v"})
    updown.add(-7, {"k": "v"})
    mp.get_meter("other.scope").create_counter("gradtel_ops_total").add(3)

    for _ in range(2):  # the second collection renders from the label cache
        steps["n"] += 1
        official = families(generate_latest(registry).decode())
        mine = families(ours.exposition().text.decode())
        assert mine == official
    assert mine["gradtel_things"][0] == "counter" and mine["gradtel_balance"][0] == "gauge"
    assert (
        "gradtel_things_total",
        frozenset(
            {
                "variable": 'with "quotes"',
                "layer": "l",
                "otel_scope_name": "gradtel",
                "otel_scope_version": "9.9.9",
                "otel_scope_schema_url": "",
            }.items()
        ),
        2 * 2,
    ) in mine["gradtel_things"][2]


def test_other_kinds_are_left_out_with_one_warning(provider, caplog):
    mp, ours, _ = provider
    meter = mp.get_meter("gradtel")
    meter.create_histogram("latency").record(1.0)
    meter.create_counter("gradtel_kept").add(1)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        for _ in range(3):
            text = ours.exposition().text.decode()
    assert "latency" not in text and "gradtel_kept" in families(text)  # the parser strips _total
    assert len([r for r in caplog.records if "latency" in r.getMessage()]) == 1


def _reader_with_counter(min_interval_s: float, cpu_share: float, burn_s: float = 0.0):
    ticks = {"n": 0}

    def callback(options: CallbackOptions):
        if burn_s:
            start = time.thread_time()
            while time.thread_time() - start < burn_s:  # a collection that costs burn_s of CPU
                pass
        return [Observation(ticks["n"])]

    reader = PrometheusReader(min_interval_s, cpu_share)
    mp = MeterProvider(metric_readers=[reader])
    mp.get_meter("gradtel").create_observable_counter("gradtel_ticks", callbacks=[callback])
    return mp, reader, ticks


def _ticks(reader: PrometheusReader) -> float:
    return families(reader.exposition().text.decode())["gradtel_ticks"][2].pop()[2]


def test_scrapes_within_the_interval_share_one_collection_then_it_refreshes():
    mp, reader, ticks = _reader_with_counter(min_interval_s=0.5, cpu_share=1.0)
    first = reader.exposition()
    ticks["n"] = 5
    assert reader.exposition() is first  # within the interval: the same rendered bytes
    time.sleep(0.6)
    assert _ticks(reader) == 5
    mp.shutdown()


def test_an_expensive_collection_spaces_the_next_by_its_cpu_share(caplog):
    mp, reader, ticks = _reader_with_counter(min_interval_s=0.0, cpu_share=0.1, burn_s=0.05)
    reader.exposition()
    assert reader.interval_s == 0.0  # the first collection (creating every series) does not set the pace
    reader.exposition()
    assert reader.interval_s >= 0.5  # 0.05 s of CPU at a 10 % share
    ticks["n"] = 3
    assert _ticks(reader) == 0  # not due yet
    time.sleep(reader.interval_s + 0.05)
    assert _ticks(reader) == 3
    ticks["n"] = 4
    reader.cpu_share = 1.0  # a larger share takes effect at once: 0.05 s of CPU now allows a collection after ~0.05 s
    time.sleep(0.15)
    assert _ticks(reader) == 4
    mp.shutdown()


def test_collections_run_with_the_cyclic_collector_paused_and_leave_it_as_found():
    seen = []
    reader = PrometheusReader(0.0, 1.0)
    mp = MeterProvider(metric_readers=[reader])
    mp.get_meter("gradtel").create_observable_gauge(
        "gradtel_gc", callbacks=[lambda options: seen.append(gc.isenabled()) or [Observation(1)]]
    )
    assert gc.isenabled()
    reader.exposition()
    assert seen == [False] and gc.isenabled()
    gc.disable()  # an application that manages the collector itself
    try:
        reader.exposition()
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        raise RuntimeError("a failing collection")
    assert gc.isenabled()
    mp.shutdown()


def test_force_flush_collects_afresh_whatever_the_interval():
    mp, reader, ticks = _reader_with_counter(min_interval_s=3600.0, cpu_share=1.0)
    assert _ticks(reader) == 0
    ticks["n"] = 7
    assert _ticks(reader) == 0
    mp.force_flush()
    assert _ticks(reader) == 7
    mp.shutdown()


def test_a_failing_collection_serves_the_previous_one_and_logs_once(caplog, monkeypatch):
    mp, reader, ticks = _reader_with_counter(min_interval_s=0.0, cpu_share=1.0)
    ticks["n"] = 2
    assert _ticks(reader) == 2

    def broken(*args, **kwargs):
        raise RuntimeError("collection broke")

    monkeypatch.setattr(reader, "collect", broken)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        assert [_ticks(reader) for _ in range(3)] == [2, 2, 2]
    assert len([r for r in caplog.records if "collection failed" in r.getMessage()]) == 1
    mp.shutdown()


def test_the_endpoint_serves_gzip_head_and_refuses_other_methods():
    mp, reader, ticks = _reader_with_counter(min_interval_s=0.0, cpu_share=1.0)
    ticks["n"] = 4
    endpoint = Endpoint(reader.exposition, "127.0.0.1", 0, Security())
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as plain:
            assert plain.headers["Content-Type"] == CONTENT_TYPE
            text = plain.read()
        request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=10) as zipped:
            assert zipped.headers["Content-Encoding"] == "gzip"
            assert families(gzip.decompress(zipped.read()).decode()) == families(text.decode())
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as head:
            assert head.status == 200 and head.read() == b""
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=10)
        assert refused.value.code == 405
        assert families(text.decode())["gradtel_ticks"][2] == {
            (
                "gradtel_ticks_total",
                frozenset(
                    {"otel_scope_name": "gradtel", "otel_scope_version": "", "otel_scope_schema_url": ""}.items()
                ),
                4.0,
            )
        }
    finally:
        endpoint.close()
        mp.shutdown()
