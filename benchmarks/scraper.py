"""A Prometheus stand-in: scrape a URL every ``interval`` seconds while an event is set (run in its own process).

Kept free of TensorFlow so the child process starts fast under the ``spawn`` start method.
"""

from __future__ import annotations

import gzip
import time
import urllib.request
from typing import Any


def scrape(url: str) -> tuple[float, int]:
    """One GET asking for gzip, as Prometheus does: (seconds, uncompressed body bytes)."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return time.perf_counter() - start, len(body)


def loop(url: str, interval: float, active: Any, stop: Any, latencies: Any) -> None:
    """Scrape every ``interval`` s while ``active`` is set, until ``stop``; append latencies to a shared list."""
    next_at = time.monotonic()
    while not stop.is_set():
        if not active.is_set():
            active.wait(0.1)
            next_at = time.monotonic()
            continue
        seconds, _ = scrape(url)
        latencies.append(seconds)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
