"""Run every benchmark section, each in a fresh process, and write results/latest.{json,md}.

    .venv/bin/python -m benchmarks.run [--quick] [--only SECTION ...] [--merge] [--out DIR] [-- SECTION ARGS]

Arguments after ``--`` go to every section run (e.g. ``--only startup --merge -- --trace-sizes 1000 10000``).

Sections: step_overhead, debugger, floor, export_cost, memory, startup (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report, timing

SECTIONS = ("step_overhead", "debugger", "floor", "export_cost", "memory", "startup")
RESULTS = Path(__file__).parent / "results"


def _section(name: str, quick: bool, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{name}.json")
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", out] + (["--quick"] if quick else []) + extra
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not os.path.exists(out):
            return {"error": done.stderr[-3000:], "wall_s": round(time.perf_counter() - start, 1)}
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (a smoke run, ~6-8 min)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the sections run in the existing latest.json (the report names them "
        "and when they were re-run)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.json and latest.md")
    parser.add_argument("extra", nargs="*", help="after --: arguments for the sections")
    args = parser.parse_args()
    started = time.perf_counter()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    previous = args.out / "latest.json"
    merging = args.merge and previous.exists()
    if merging:
        results: dict[str, Any] = json.loads(previous.read_text())
        results.setdefault("rerun", {})
    else:
        results = {"mode": "quick" if args.quick else "full", "started_utc": now, "machine": timing.machine()}
    for name in args.only or SECTIONS:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        results[name] = _section(name, args.quick, args.extra)
        if merging:
            results["rerun"][name] = now
        print(f"[benchmarks] {name} done in {results[name].get('wall_s')} s", file=sys.stderr, flush=True)
    if not merging:  # the run's own totals; a merge keeps the first run's
        results["wall_s"] = round(time.perf_counter() - started, 1)
        results["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (args.out / "latest.md").write_text(report.markdown(results))
    print(report.markdown(results))


if __name__ == "__main__":
    main()
