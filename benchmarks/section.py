"""The entry point every section shares, so ``run.py`` can start each one in a fresh process.

A fresh process per section matters: gradtel keeps every handle it ever created (their series stay exported),
the TF debugger is process-global, and RSS measurements must not inherit another section's heap.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(run: Callable[[bool], dict[str, Any]]) -> None:
    """Parse ``--quick --out FILE``, run the section, write its JSON (with its wall time)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.quick)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=float)


def start_exporter(series_mode: str = "auto") -> Any:
    """gradtel's real export on a free port (never the default 9464, which a demo may hold).

    ``series_mode`` is GRADTEL_VARIABLE_SERIES: ``auto`` (the default: per-variable series up to a budget, per layer
    beyond it) or ``variable`` (every variable its own series: the worst case for a scrape).
    """
    import dataclasses

    from gradtel import export
    from gradtel.config import Config

    config = Config.from_env({"GRADTEL_VARIABLE_SERIES": series_mode, "OTEL_METRICS_EXPORTER": "prometheus"})
    return export.ensure_started(dataclasses.replace(config, prometheus_port=0, run_id="bench"))
