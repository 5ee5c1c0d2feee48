"""Start-up: the first step (trace + first call) and peak memory, plain vs instrumented, as the variables grow.

A job pays start-up once, but it is what a user meets first, and it was where gradtel's cost grew with the square of
the variables (a zero hint walked the graph once per variable). Each measurement is its own process (start-up and
peak RSS are per process); plain and instrumented children alternate, round after round, so both see the same
machine load. Instrumented means ``gradtel.instrument(optimizer, start_exporter=False)``, which installs the
process's Diagnoser as ``gradtel run`` does: the diagnosis is on.

The model is N small Keras weights (``add_weight`` of shape (4,), half of them fed through ReLU) on one layer, a
loss that reads every weight and a Keras SGD step in a ``tf.function``: every op of the step is per variable (about
12 ops each: no matmul, no layer machinery), so the plain first step is the least TensorFlow needs for N variables
and the ratio shows gradtel's own growth. Even so TensorFlow's own first step grows faster than linearly here
(7 s at 1,000 variables, 212 s at 10,000, not done in 480 s at 50,000 on 2 loaded cores; see docs/benchmarks.md).

A child that runs past ``--timeout`` is killed and its cell reads "did not finish in T s"; larger sizes then skip
that variant (it would not finish either). An instrumented child that did not finish leaves the plain ones measured;
a plain one that did not finish leaves nothing to compare with, so the size's instrumented children are not run.

    .venv/bin/python -m benchmarks.startup --out FILE [--quick] [--sizes 100 1000] [--trace-sizes 50000]
        [--rounds R] [--timeout S]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import section, timing

MIB = 2**20
#: variables -> rounds (each round one plain and one instrumented child, in alternating order).
SIZES = {100: 9, 1_000: 5, 10_000: 3}
QUICK_SIZES = {100: 2, 1_000: 2}
#: variables -> rounds of the trace-only measurement (see ``child``): it reaches 50,000 variables.
TRACE_SIZES = {1_000: 3, 10_000: 3, 50_000: 1}
QUICK_TRACE_SIZES = {1_000: 2}
#: Seconds a child may run before its cell is reported as not finished (a quadratic start-up must not hang the run).
CHILD_TIMEOUT_S = 1_200
VARIANTS = ("plain", "gradtel")
REPO = Path(__file__).resolve().parent.parent


def child(n: int, instrumented: bool, trace_only: bool = False) -> dict[str, Any]:
    """Build N weights, trace and run one SGD step; time it and read this process's peak RSS.

    ``trace_only``: trace the step (``get_concrete_function``) without running it. TensorFlow's first call (graph
    optimisation and executor set-up, in C++) grows faster than linearly with this model and makes the first step
    unmeasurable at 50,000 variables here; the trace alone is the Python work where gradtel's own per-variable cost
    (its ops, its diagnosis) is paid, so it shows gradtel's growth at sizes the first step cannot reach.
    """
    os.environ.setdefault("OTEL_METRICS_EXPORTER", "none")
    import keras
    import tensorflow as tf

    rss_start = timing.rss_bytes()  # TensorFlow and Keras loaded, nothing built: what every process pays
    started = time.perf_counter()

    class ManyWeights(keras.layers.Layer):
        def build(self, input_shape: Any) -> None:
            self.parts = [self.add_weight(shape=(4,), name=f"w{i}") for i in range(n)]

        def call(self, x: Any) -> Any:
            terms = [tf.reduce_sum(tf.nn.relu(w * x) if i % 2 else w * x) for i, w in enumerate(self.parts)]
            return tf.add_n(terms)

    layer = ManyWeights()
    x = tf.ones((4,))
    layer.build(x.shape)
    optimizer = keras.optimizers.SGD(0.01)
    if instrumented:
        import gradtel

        gradtel.instrument(optimizer, start_exporter=False)
    # Both variants enter the timed part with a collected heap. Otherwise a child that happens to sit just under
    # the threshold of a full collection pays it in the window for any allocation at all: at 100 variables every
    # instrumented child paid one (0.12-0.16 s) and no plain child did, while the plain ones sat one gen-1 collection
    # from it. Collections inside the window are still timed, and counted as ``gc_s``.
    gc.collect()
    built = time.perf_counter()
    rss_built = timing.rss_bytes()

    @tf.function
    def step() -> Any:
        with tf.GradientTape() as tape:
            loss = tf.square(layer(x) - 1.0)
        optimizer.apply(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables)
        return loss

    if trace_only:
        step.get_concrete_function()
        traced = time.perf_counter()
        return {
            "variables": len(layer.trainable_variables),
            "build_s": built - started,
            "trace_s": traced - built,
            "rss_start_mib": rss_start / MIB,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    collecting = _collection_timer()
    step.get_concrete_function()  # what ``step()`` would trace first: timed apart so the phases can be told apart
    traced = time.perf_counter()
    timing.sync(step())
    first = time.perf_counter()
    gc_s = collecting()
    timing.sync(step())
    second = time.perf_counter()
    return {
        "variables": len(layer.trainable_variables),
        "build_s": built - started,
        "first_step_s": first - built,
        "step_trace_s": traced - built,
        "first_call_s": first - traced,
        "gc_s": gc_s,
        "second_step_ms": (second - first) * 1e3,
        "rss_start_mib": rss_start / MIB,
        "rss_built_mib": rss_built / MIB,
        "rss_end_mib": timing.rss_bytes() / MIB,  # after the second step: what stays once the trace is done
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _collection_timer() -> Any:
    """Start timing Python's garbage collections; the returned function stops and gives their seconds.

    Why: a full collection walks every tracked object (TensorFlow and Keras hold about 300,000 at start), so it
    costs 0.2 s at 100 variables and 0.6 s at 10,000; a process crosses the allocation threshold that triggers one
    at a point that depends on everything allocated before, so one child can pay a collection its twin just missed.
    """
    spent = [0.0, 0.0]  # seconds so far, start of the running collection

    def timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            spent[1] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - spent[1]

    gc.callbacks.append(timer)

    def stop() -> float:
        gc.callbacks.remove(timer)
        return spent[0]

    return stop


def _spawn(n: int, variant: str, timeout_s: float, trace_only: bool) -> dict[str, Any]:
    """One child's measurement, or ``{"error": ...}`` when it failed or ran past ``timeout_s`` (it is killed)."""
    cmd = [sys.executable, "-m", "benchmarks.startup", "--child", str(n)]
    cmd += ["--instrumented"] if variant == "gradtel" else []
    cmd += ["--trace-only"] if trace_only else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout_s:.0f} s", "timed_out": True}
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict[str, float]:
    q1, median, q3 = timing.quantiles(values)
    return {"median": median, "q1": q1, "q3": q3, "minimum": min(values), "maximum": max(values), "rounds": len(values)}


def _variant_stats(variant: str, runs: list[dict[str, Any]], timed: str) -> dict[str, Any]:
    """Median and spread of one variant's timed phase (``timed``: first_step_s or trace_s), build and memory (own =
    peak above the imports)."""
    out = {
        f"{variant}_{timed}": _stats([r[timed] for r in runs]),
        f"{variant}_build_s": _stats([r["build_s"] for r in runs]),
        f"{variant}_peak_rss_mib": _stats([r["peak_rss_mib"] for r in runs]),
        f"{variant}_own_peak_mib": _stats([r["peak_rss_mib"] - r["rss_start_mib"] for r in runs]),
    }
    if timed == "first_step_s":
        out[f"{variant}_second_step_ms"] = _stats([r["second_step_ms"] for r in runs])
        for phase in ("step_trace_s", "first_call_s", "gc_s"):
            out[f"{variant}_{phase}"] = _stats([r[phase] for r in runs])
    return out


def _paired_stats(n: int, plain: list[dict[str, Any]], inst: list[dict[str, Any]], timed: str) -> dict[str, Any]:
    """Per-round comparisons: each round's instrumented child against the plain child it alternated with."""
    pairs = list(zip(plain, inst, strict=False))
    extra = [i["peak_rss_mib"] - p["peak_rss_mib"] for p, i in pairs]
    out = {
        f"{timed.removesuffix('_s')}_ratio": _stats([i[timed] / p[timed] for p, i in pairs]),
        "extra_peak_rss_mib": _stats(extra),
        "extra_peak_rss_share": _stats([e / p["peak_rss_mib"] for e, (p, _) in zip(extra, pairs, strict=True)]),
        "extra_kib_per_variable": _stats([e * 1024 / n for e in extra]),
    }
    if timed == "first_step_s":  # what is still held after the second step (the transient part is the trace's)
        out["extra_end_rss_mib"] = _stats([i["rss_end_mib"] - p["rss_end_mib"] for p, i in pairs])
        # Where the extra time goes: the trace (Python: gradtel's ops and diagnosis), TensorFlow's first call
        # (graph optimisation and kernels for gradtel's ops), and garbage collection (in both, counted apart).
        out["step_trace_ratio"] = _stats([i["step_trace_s"] / p["step_trace_s"] for p, i in pairs])
        out["first_call_ratio"] = _stats([i["first_call_s"] / p["first_call_s"] for p, i in pairs])
        extra_s = [i[timed] - p[timed] for p, i in pairs]
        out["extra_first_step_s"] = _stats(extra_s)
        out["extra_gc_s"] = _stats([i["gc_s"] - p["gc_s"] for p, i in pairs])
        out["extra_ms_per_variable"] = _stats([e * 1e3 / n for e in extra_s])
    return out


def measure(n: int, rounds: int, timeout_s: float, skip: dict[str, str], trace_only: bool = False) -> dict[str, Any]:
    """``rounds`` rounds of one child per variant, plain first in even rounds and instrumented first in odd ones.

    A variant in ``skip`` (variant -> why) is not run. A variant whose child fails or times out is not run again
    at this size: its error (with the rounds it had finished) replaces its statistics; once the plain child has
    failed, the instrumented one is not run either (there is nothing to compare it with).
    """
    timed = "trace_s" if trace_only else "first_step_s"
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    errors = dict(skip)
    for r in range(rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            if "plain" in errors:  # no ratio is possible at this size: do not spend the gradtel child's time
                errors.setdefault("gradtel", "not run: no plain child finished at this size")
            if variant in errors:
                continue
            result = _spawn(n, variant, timeout_s, trace_only)
            if "error" in result:
                errors[variant] = f"{result['error']} (round {r + 1} of {rounds})"
            else:
                runs[variant].append(result)
        done = ", ".join(
            f"{v} {runs[v][-1][timed]:.1f} s" if v not in errors else f"{v} {errors[v][:60]}" for v in VARIANTS
        )
        print(f"[startup] {n} variables, {timed}, round {r + 1}/{rounds}: {done}", file=sys.stderr, flush=True)
        if all(v in errors for v in VARIANTS):
            break
    out: dict[str, Any] = {"variables": n, "errors": errors, "rounds": runs}
    for variant in VARIANTS:
        if variant not in errors:
            out.update(_variant_stats(variant, runs[variant], timed))
    if not errors:
        out.update(_paired_stats(n, runs["plain"], runs["gradtel"], timed))
    return out


def code_version() -> dict[str, Any]:
    """The commit measured and gradtel's files changed since it (a result must say which code it timed)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "gradtel_changed": git("status", "--porcelain", "--", "gradtel").splitlines(),
    }


def run(sizes: dict[int, int], trace_sizes: dict[int, int], timeout_s: float) -> dict[str, Any]:
    """Every size in increasing order, first steps then traces; a variant that timed out is skipped at the larger
    sizes of the same measurement."""
    results: dict[str, Any] = {"code": code_version(), "timeout_s": timeout_s, "trace": {}}
    for trace_only, table, into in ((False, sizes, results), (True, trace_sizes, results["trace"])):
        skip: dict[str, str] = {}
        for n in sorted(table):
            into[str(n)] = measure(n, table[n], timeout_s, skip, trace_only)
            for variant, error in into[str(n)]["errors"].items():
                if variant not in skip and "did not finish" in error:
                    skip[variant] = f"not run: did not finish at {n:,} variables in {timeout_s:.0f} s"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--instrumented", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trace-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", help="first-step variable counts, instead of the default")
    parser.add_argument("--trace-sizes", type=int, nargs="*", help="trace-only variable counts, instead of the default")
    parser.add_argument("--rounds", type=int, help="rounds at every size (default: see SIZES, TRACE_SIZES; --quick: 2)")
    parser.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds one child may run")
    args, rest = parser.parse_known_args()  # --quick and --out are the shared section options
    if args.child:
        print(json.dumps(child(args.child, args.instrumented, args.trace_only)))
        return
    sys.argv = [sys.argv[0], *rest]

    def chosen(given: list[int] | None, table: dict[int, int]) -> dict[int, int]:
        sizes = table if given is None else given  # an empty list measures nothing
        return {n: args.rounds or table.get(n, 3 if n <= 10_000 else 1) for n in sizes}

    section.main(
        lambda quick: run(
            chosen(args.sizes, QUICK_SIZES if quick else SIZES),
            chosen(args.trace_sizes, QUICK_TRACE_SIZES if quick else TRACE_SIZES),
            args.timeout,
        )
    )


if __name__ == "__main__":
    main()
