"""Interleaved A/B timing on a shared, noisy CPU, and the machine facts a result is meaningless without.

A single long run of A then B measures the machine's mood as much as the code; alternating short blocks of K
steps (ABBA order, so drift cancels) and taking the median of per-round ratios is robust to both.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any


@dataclass(frozen=True)
class Ratio:
    """Per-round ratios of candidate over baseline block time, summarised."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    rounds: int
    base_step_ms: float  # median baseline time per step
    cand_step_ms: float  # median candidate time per step
    ci_low: float  # a 95 % confidence interval of the median ratio (order statistics: no distribution assumed)
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def text(self) -> str:
        return (
            f"{self.median:.3f} (IQR {self.q1:.3f}-{self.q3:.3f}, min-max {self.minimum:.3f}-{self.maximum:.3f}, "
            f"n={self.rounds})"
        )


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """Q1, median, Q3 (inclusive method: sensible for small samples)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95 % confidence interval of the median: the order statistics n/2 -+ 0.98 sqrt(n) (the normal
    approximation of the binomial count below the median). Why: a goal 1 % from 1.0 needs the median's own
    uncertainty beside it, not only the spread of single rounds."""
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * n**0.5
    low, high = max(0, int(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low], ordered[high]


def summarise(base: list[float], cand: list[float], steps: int) -> Ratio:
    ratios = [c / b for b, c in zip(base, cand, strict=True)]
    q1, med, q3 = quantiles(ratios)
    return Ratio(
        med,
        q1,
        q3,
        min(ratios),
        max(ratios),
        len(ratios),
        1e3 * statistics.median(base) / steps,
        1e3 * statistics.median(cand) / steps,
        *median_interval(ratios),
    )


def sync(value: Any) -> None:
    """Wait for the step's result (a TF tensor or a structure holding one) so a block's time is its compute."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    if hasattr(value, "numpy"):
        value.numpy()


def block(run: Callable[[], Any], steps: int) -> float:
    """Seconds for ``steps`` calls of ``run``, synchronised at the end."""
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = run()
    sync(out)
    return time.perf_counter() - start


def interleave(
    runners: Mapping[str, Callable[[], Any]], baseline: str, steps: int, rounds: int, warmup: int = 3
) -> dict[str, Ratio]:
    """Time every runner in alternating blocks; return each non-baseline runner's ratio against ``baseline``.

    Each round runs all runners once, in forward order on even rounds and reverse order on odd ones.
    """
    names = list(runners)
    for name in names:  # trace, build, fill caches
        block(runners[name], warmup)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(block(runners[name], steps))
    return {n: summarise(times[baseline], times[n], steps) for n in names if n != baseline}


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS in /proc/self/status), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and the library versions that decide the numbers."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "keras": _version("keras"),
        "tf_keras": _version("tf-keras"),
        "opentelemetry_sdk": _version("opentelemetry-sdk"),
        "opentelemetry_exporter_prometheus": _version("opentelemetry-exporter-prometheus"),
        "prometheus_client": _version("prometheus-client"),
        "gradtel": _version("gradtel"),
        "load_average_at_start": os.getloadavg(),
    }
