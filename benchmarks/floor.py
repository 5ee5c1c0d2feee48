"""The floor: gradtel's statistics against the optimizer's own update, on the same gradients.

A step-time ratio mixes in the forward and backward passes; this isolates the two things gradtel adds to and
competes with. Each is a ``tf.function`` over fixed gradients: (a) only ``StatsTable.update`` (the shipped
statistics), (b) only ``optimizer.apply`` (Adam), and (c) a function that reads the same gradients and does nothing
(the call floor both pay). Op counts come from the traced graphs (on CPU, op count is what a step of small tensors
pays for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from benchmarks import models, timing
from gradtel import stats


def _grads(w: models.Workload) -> list[Any]:
    variables = w.model.trainable_variables
    with tf.GradientTape() as tape:
        loss = w.loss(w.y, w.model(w.x, training=True))
    return tape.gradient(loss, variables)


def _held(grads: list[Any]) -> Callable[[], list[Any]]:
    """The gradients kept in variables, and a function that reads them back inside a trace.

    Why: passing 130 tensors as tf.function arguments costs milliseconds of Python argument binding per call,
    and capturing small eager tensors embeds them as constants that grappler folds away; one ReadVariableOp per
    gradient is a cost every variant pays alike (see ``call_floor``).
    """
    held: list[Any] = []
    for g in grads:
        if g is None:
            held.append(None)
        elif isinstance(g, tf.IndexedSlices):
            held.append((tf.Variable(g.values), tf.Variable(g.indices), g.dense_shape))
        else:
            held.append(tf.Variable(g))

    def read() -> list[Any]:
        return [
            tf.IndexedSlices(h[0].read_value(), h[1].read_value(), h[2])
            if isinstance(h, tuple)
            else None
            if h is None
            else h.read_value()
            for h in held
        ]

    read.held = held  # type: ignore[attr-defined]  # keep the variables alive
    return read


def _ops(fn: Any) -> int:
    """Ops in the traced graph, variable captures (Placeholder) left out."""
    return sum(1 for op in fn.get_concrete_function().graph.get_operations() if op.type != "Placeholder")


def _stats_fn(read: Callable[[], list[Any]], name: str) -> tuple[Any, stats.StatsTable]:
    table = stats.StatsTable(len(read.held), name)  # type: ignore[attr-defined]
    return tf.function(lambda: table.update(read()), autograph=False), table


def _adam_fn(optimizer: Any, read: Callable[[], list[Any]], variables: list[Any]) -> Any:
    return tf.function(lambda: optimizer.apply(read(), variables), autograph=False)


def _touch(read: Callable[[], list[Any]]) -> Any:
    """The call floor: read the same gradients and do nothing with them."""

    def fn() -> tf.Tensor:
        with tf.control_dependencies([tf.convert_to_tensor(g) for g in read() if g is not None]):
            return tf.constant(0.0)

    return tf.function(fn, autograph=False)


def run(quick: bool) -> dict[str, Any]:
    rounds, steps = (5, 10) if quick else (15, 20)
    out: dict[str, Any] = {}
    for builder in ("deep_mlp", "transformer"):
        w = models.BUILDERS[builder]()
        grads = _grads(w)
        variables = w.model.trainable_variables
        w.optimizer.build(variables)
        read = _held(grads)
        adam, call = _adam_fn(w.optimizer, read, variables), _touch(read)
        shipped, _ = _stats_fn(read, f"floor_{builder}")
        fns = {"adam": adam, "call_floor": call, "stats": shipped}
        ratios = timing.interleave(fns, "adam", steps=steps, rounds=rounds)
        out[builder] = {
            "variables": len(variables),
            "adam_ms": ratios["stats"].base_step_ms,
            "call_floor_ms": ratios["call_floor"].cand_step_ms,
            "stats_ms": ratios["stats"].cand_step_ms,
            "stats_over_adam": ratios["stats"].as_dict(),
            "call_floor_over_adam": ratios["call_floor"].as_dict(),
            **{f"ops_{k}": _ops(f) for k, f in fns.items()},
        }
    return out


if __name__ == "__main__":
    from benchmarks.section import main

    main(run)
