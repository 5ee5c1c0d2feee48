"""TF Debugger V2 (``tf.debugging.experimental.enable_dump_debug_info``, NO_TENSOR mode) against a plain twin.

The debugger is process-global, so it runs in this section's own process. The plain twin is traced BEFORE the
debugger is enabled (so its graph carries no debug ops); the debugged twin is traced after. Caveat, in the
debugger's favour: while enabled, the debugger also records one execution event per eager op, including each
call of the plain twin's function, so the plain baseline carries a little debugger cost too.
"""

from __future__ import annotations

import tempfile
from typing import Any

import tensorflow as tf

from benchmarks import models, section, timing


def run(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as dump_root:
        cases = {"deep_mlp": 10} if quick else {"deep_mlp": 20, "transformer": 10}
        plains = {}
        for builder in cases:
            plains[builder] = models.graph_step(models.BUILDERS[builder]())
            timing.block(plains[builder], 1)
        tf.debugging.experimental.enable_dump_debug_info(
            dump_root, tensor_debug_mode="NO_TENSOR", circular_buffer_size=1000
        )
        try:
            for builder, steps in cases.items():
                debugged = models.graph_step(models.BUILDERS[builder]())
                ratios = timing.interleave(
                    {"plain": plains[builder], "tf_debugger_no_tensor": debugged},
                    "plain",
                    steps=steps,
                    rounds=5 if quick else 9,
                )
                out[builder] = {n: r.as_dict() for n, r in ratios.items()}
        finally:
            tf.debugging.experimental.disable_dump_debug_info()
    return out


if __name__ == "__main__":
    section.main(run)
