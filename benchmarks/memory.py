"""Memory: gradtel's extra resident memory at 10,000 variables, and RSS over a long run (must stay flat).

Both measurements compare against a plain twin in its own process (RSS is per process, and a process that once
instrumented keeps gradtel's handles). RSS is VmRSS from /proc/self/status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from benchmarks import section, timing

MIB = 2**20


def wide_rss(n: int, instrumented: bool) -> dict[str, Any]:
    """RSS growth from 'exporter up' to 'variables made, traced, 20 steps, one scrape', with or without gradtel."""
    from benchmarks import models

    exporter = section.start_exporter()
    before = timing.rss_bytes()
    fn, _ = models.wide_update(n, instrumented)
    timing.block(fn, 20)
    after_steps = timing.rss_bytes()
    from benchmarks.scraper import scrape

    scrape(f"http://127.0.0.1:{exporter.endpoint[1]}/metrics")
    after_scrape = timing.rss_bytes()
    return {"before": before, "after_steps": after_steps, "after_scrape": after_scrape}


def long_run(steps: int, every: int, instrumented: bool) -> dict[str, Any]:
    """RSS every ``every`` steps of the tiny model (instrumented runs also scrape at each sample)."""
    import gradtel
    from benchmarks import models
    from benchmarks.scraper import scrape

    exporter = section.start_exporter()
    w = models.tiny()
    if instrumented:
        gradtel.instrument(w.optimizer, start_exporter=False)
    step = models.graph_step(w)
    timing.block(step, 100)
    samples, start = [], time.perf_counter()
    for done in range(0, steps + 1, every):
        if done:
            timing.block(step, every)
        if instrumented:
            scrape(f"http://127.0.0.1:{exporter.endpoint[1]}/metrics")
        samples.append((done, timing.rss_bytes()))
    return {"samples": samples, "seconds": time.perf_counter() - start}


def _slope(samples: list[list[int]]) -> float:
    """Least-squares RSS slope in bytes per step, ignoring the first sample (allocator warm-up)."""
    pts = samples[1:] if len(samples) > 2 else samples
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def _child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict[str, Any]:
    n = 2_000 if quick else 10_000
    inst, plain = _child(["--wide", str(n), "--instrumented"]), _child(["--wide", str(n)])
    out: dict[str, Any] = {
        "wide": {
            "variables": n,
            "extra_after_steps_mib": ((inst["after_steps"] - inst["before"]) - (plain["after_steps"] - plain["before"]))
            / MIB,
            "extra_after_scrape_mib": (
                (inst["after_scrape"] - inst["before"]) - (plain["after_scrape"] - plain["before"])
            )
            / MIB,
            "instrumented": inst,
            "plain": plain,
        }
    }
    steps, every = (5_000, 500) if quick else (100_000, 10_000)
    for name, flag in (("instrumented", ["--instrumented"]), ("plain", [])):
        length = steps if name == "instrumented" else steps // 2  # the plain twin is context: half as long
        result = _child(["--long", str(length), "--every", str(every), *flag])
        slope = _slope(result["samples"])
        result.update(
            slope_bytes_per_step=slope,
            growth_mib_per_100k_steps=slope * 100_000 / MIB,
            first_to_last_mib=(result["samples"][-1][1] - result["samples"][1][1]) / MIB,
        )
        out[f"long_{name}"] = result
    return out


if __name__ == "__main__":
    if "--wide" in sys.argv or "--long" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--wide", type=int)
        parser.add_argument("--long", type=int)
        parser.add_argument("--every", type=int, default=10_000)
        parser.add_argument("--instrumented", action="store_true")
        a = parser.parse_args()
        result = wide_rss(a.wide, a.instrumented) if a.wide else long_run(a.long, a.every, a.instrumented)
        print(json.dumps(result))
    else:
        section.main(run)
