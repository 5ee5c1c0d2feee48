"""Start-up: the first step (trace + first call) and peak memory, plain vs instrumented, as the variables grow.

A job pays start-up once, but it is what a user meets first, and it was where gradtel's cost grew with the square of
the variables (a zero hint walked the graph once per variable). Each measurement is its own process (start-up and
peak RSS are per process); plain and instrumented children alternate, round after round, so both see the same
machine load. Instrumented means ``gradtel.instrument(optimizer)`` with the diagnosis on, as under ``gradtel run``.

The model is N small Keras weights (``add_weight`` of shape (4,), half of them fed through ReLU) on one layer, a
loss that reads every weight and a Keras SGD step in a ``tf.function``: every op of the step is per variable, so the
plain first step itself grows linearly and the ratio shows gradtel's own growth. (A functional model of N/2 Dense
layers has the same shape of cost but takes ~90 s to build and ~6 min for a first step at 50,000 variables here.)

    .venv/bin/python -m benchmarks.startup --out FILE [--quick] [--sizes 100 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from benchmarks import section, timing

MIB = 2**20
#: variables -> rounds (each round one plain and one instrumented child).
SIZES = {100: 5, 1_000: 5, 10_000: 3, 50_000: 1}
QUICK_SIZES = {100: 2, 1_000: 2}
#: A child that runs longer is reported as not finished (a quadratic start-up must not hang the benchmark).
CHILD_TIMEOUT_S = 1_200


def child(n: int, instrumented: bool) -> dict[str, Any]:
    """Build N weights, trace and run one SGD step; time it and read this process's peak RSS."""
    os.environ.setdefault("OTEL_METRICS_EXPORTER", "none")
    import keras
    import tensorflow as tf

    rss_start = timing.rss_bytes()
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
    built = time.perf_counter()
    rss_built = timing.rss_bytes()

    @tf.function
    def step() -> Any:
        with tf.GradientTape() as tape:
            loss = tf.square(layer(x) - 1.0)
        optimizer.apply(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables)
        return loss

    timing.sync(step())
    first = time.perf_counter()
    timing.sync(step())
    second = time.perf_counter()
    return {
        "variables": len(layer.trainable_variables),
        "build_s": built - started,
        "first_step_s": first - built,
        "second_step_ms": (second - first) * 1e3,
        "rss_start_mib": rss_start / MIB,
        "rss_built_mib": rss_built / MIB,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _spawn(n: int, instrumented: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.startup", "--child", str(n)] + (["--instrumented"] if instrumented else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {CHILD_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict[str, float]:
    q1, median, q3 = timing.quantiles(values)
    return {"median": median, "q1": q1, "q3": q3, "minimum": min(values), "maximum": max(values),
            "rounds": len(values)}


def measure(n: int, rounds: int) -> dict[str, Any]:
    """``rounds`` pairs of children, plain first in even rounds and instrumented first in odd ones."""
    plain, inst = [], []
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for instrumented in order:
            result = _spawn(n, instrumented)
            if "error" in result:
                return {"error": result["error"], "instrumented": instrumented, "completed_rounds": r}
            (inst if instrumented else plain).append(result)
        print(f"[startup] {n} variables, round {r + 1}/{rounds}: plain {plain[-1]['first_step_s']:.1f} s, "
              f"gradtel {inst[-1]['first_step_s']:.1f} s", file=sys.stderr, flush=True)
    ratio = [i["first_step_s"] / p["first_step_s"] for p, i in zip(plain, inst, strict=True)]
    extra = [i["peak_rss_mib"] - p["peak_rss_mib"] for p, i in zip(plain, inst, strict=True)]
    share = [e / p["peak_rss_mib"] for e, p in zip(extra, plain, strict=True)]
    return {
        "variables": n,
        "plain_first_step_s": _stats([p["first_step_s"] for p in plain]),
        "gradtel_first_step_s": _stats([i["first_step_s"] for i in inst]),
        "first_step_ratio": _stats(ratio),
        "plain_peak_rss_mib": _stats([p["peak_rss_mib"] for p in plain]),
        "extra_peak_rss_mib": _stats(extra),
        "extra_peak_rss_share": _stats(share),
        "extra_kib_per_variable": _stats([e * 1024 / n for e in extra]),
        "plain_build_s": _stats([p["build_s"] for p in plain]),
        "gradtel_build_s": _stats([i["build_s"] for i in inst]),
        "rounds": {"plain": plain, "gradtel": inst},
    }


def run(quick: bool, sizes: dict[int, int] | None = None) -> dict[str, Any]:
    chosen = sizes or (QUICK_SIZES if quick else SIZES)
    return {str(n): measure(n, rounds) for n, rounds in chosen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--instrumented", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", help="variable counts (3 rounds each), instead of the default")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.instrumented)))
        return
    if args.sizes:
        sizes = {n: 3 for n in args.sizes}
        sys.argv = [sys.argv[0], "--out", args.out or "/dev/stdout"] + (["--quick"] if args.quick else [])
        section.main(lambda quick: run(quick, sizes))
        return
    section.main(run)


if __name__ == "__main__":
    main()
