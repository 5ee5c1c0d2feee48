"""Export cost at 100, 1,000 and 10,000 variables, through gradtel's real Prometheus endpoint.

Each size runs in its own process (gradtel keeps every handle it created, and all of them are exported). In it:
a table of N variables is filled by an instrumented optimizer; /metrics is scraped sequentially, first with every
scrape collecting afresh (the cost of one collection: the SDK's callbacks and aggregation plus rendering), then
with the shipped spacing (scrapes served from the last collection; the interval the reader chose); then the
optimizer-bound model trains, instrumented, in alternating blocks with and without a separate scraper process
(a Prometheus stand-in) hitting the endpoint every second, with the shipped settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import section, timing

#: (variables, GRADTEL_VARIABLE_SERIES). ``variable`` at 10,000 is the worst case the goals are about; ``auto`` (the
#: default) folds variables into per-layer series beyond its budget.
CASES = ((100, "auto"), (1_000, "auto"), (10_000, "variable"), (10_000, "auto"))
QUICK_CASES = CASES[1:2]  # 1,000 variables only: each case is a process, a trace and ~15 s of training


def _fill_table(n: int) -> Any:
    """N variables in one instrumented table, filled by a few traced steps (see ``models.wide_update``)."""
    from benchmarks import models

    fn, handle = models.wide_update(n, instrumented=True, name=f"wide_{n}")
    start = time.perf_counter()
    timing.block(fn, 1)
    trace_s = time.perf_counter() - start
    timing.block(fn, 3)
    return handle, trace_s


def _latencies(url: str, count: int) -> tuple[list[float], int]:
    from benchmarks.scraper import scrape

    times, size = [], 0
    for _ in range(count):
        time.sleep(0.2)
        seconds, size = scrape(url)
        times.append(seconds)
    return times, size


def _fresh_latencies(reader: Any, url: str, count: int) -> tuple[list[float], int]:
    """Scrapes that each collect afresh (the reader's spacing switched off, then restored)."""
    shipped = reader.min_interval_s, reader.cpu_share
    reader.min_interval_s, reader.cpu_share = 0.0, float("inf")  # no spacing: every scrape collects
    try:
        return _latencies(url, count)
    finally:
        reader.min_interval_s, reader.cpu_share = shipped


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.9 * (len(values) - 1)))]


def one(n: int, mode: str, quick: bool) -> dict[str, Any]:
    """Everything for one size and series mode, in this process."""
    import gradtel
    from benchmarks import models

    exporter = section.start_exporter(mode)
    url = f"http://127.0.0.1:{exporter.endpoint[1]}/metrics"
    handle, trace_s = _fill_table(n)
    fresh, size = _fresh_latencies(exporter.prometheus_reader, url, 5 if quick else 8)
    served, _ = _latencies(url, 10)  # with the shipped spacing: the first may collect, the rest are served
    interval_s = exporter.prometheus_reader.interval_s
    body = __import__("urllib.request").request.urlopen(url).read().decode()
    series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    start = time.perf_counter()
    handle.records()
    records_s = time.perf_counter() - start

    w = models.deep_mlp()
    gradtel.instrument(w.optimizer, start_exporter=False)
    step = models.graph_step(w)
    timing.block(step, 3)
    steps = max(1, int(2.5 / (timing.block(step, 10) / 10)))  # a block lasts ~2.5 s: 2-3 scrapes
    context = multiprocessing.get_context("spawn")
    from benchmarks import scraper

    active, stop = context.Event(), context.Event()
    manager = context.Manager()
    latencies = manager.list()
    child = context.Process(target=scraper.loop, args=(url, 1.0, active, stop, latencies), daemon=True)
    child.start()

    def scraped() -> Any:
        active.set()
        try:
            return timing.block(step, steps)
        finally:
            active.clear()

    try:
        ratio = timing.interleave(
            {"quiet": lambda: timing.block(step, steps), "scraped_1hz": scraped},
            "quiet",
            steps=1,
            rounds=2 if quick else 6,
            warmup=0,
        )["scraped_1hz"]
    finally:
        stop.set()
        child.join(30)
    during = list(latencies)
    return {
        "variables": n,
        "series_mode": mode,
        "trace_s": trace_s,
        "collection_scrape_median_ms": 1e3 * statistics.median(fresh),
        "collection_scrape_p90_ms": 1e3 * _p90(fresh),
        "collection_scrape_max_ms": 1e3 * max(fresh),
        "served_scrape_median_ms": 1e3 * statistics.median(served),
        "served_scrape_p90_ms": 1e3 * _p90(served),
        "collection_interval_s": interval_s,
        "response_bytes": size,
        "series": series,
        "handle_records_ms": 1e3 * records_s,
        "step_ratio_scraped_1hz": ratio.median,
        "step_ratio_scraped_1hz_iqr": [ratio.q1, ratio.q3],
        "step_ratio_scraped_1hz_minmax": [ratio.minimum, ratio.maximum],
        "step_ratio_rounds": ratio.rounds,
        "steps_per_block": steps,
        "step_ms_quiet": ratio.base_step_ms / steps,
        "scrape_median_ms_while_training": 1e3 * statistics.median(during) if during else None,
        "scrapes_while_training": len(during),
    }


def run(quick: bool) -> dict[str, Any]:
    """One child process per case."""
    out: dict[str, Any] = {}
    for n, mode in QUICK_CASES if quick else CASES:
        cmd = [sys.executable, "-m", "benchmarks.export_cost", "--variables", str(n), "--series", mode]
        done = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True, check=False)
        key = f"{n}_{mode}"
        if done.returncode != 0:
            out[key] = {"error": done.stderr[-2000:]}
            continue
        out[key] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


if __name__ == "__main__":
    if "--variables" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--variables", type=int, required=True)
        parser.add_argument("--series", default="auto")
        parser.add_argument("--quick", action="store_true")
        args = parser.parse_args()
        print(json.dumps(one(args.variables, args.series, args.quick), default=float))
    else:
        section.main(run)
