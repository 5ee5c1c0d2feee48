"""The models and step functions the benchmarks time.

Every builder returns a fresh model + optimizer pair built identically from a seed, so an instrumented twin and a
plain twin differ only in gradtel: an optimizer once instrumented keeps its traced steps, so A/B comparisons need
two instances, each with its own ``tf.function``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf


@dataclass
class Workload:
    """A model, its optimizer and one batch: what a step function closes over."""

    name: str
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    x: tf.Tensor
    y: tf.Tensor
    loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def deep_mlp(depth: int = 64, width: int = 32, batch: int = 16, seed: int = 0) -> Workload:
    """Optimizer-bound: many tiny Dense layers, so Adam's per-variable update (and gradtel's share) dominates."""
    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((batch, width)), tf.float32)
    y = tf.constant(rng.standard_normal((batch, 1)), tf.float32)
    return Workload("deep_mlp", model, keras.optimizers.Adam(1e-4), x, y, keras.losses.MeanSquaredError())


def transformer(
    vocab: int = 1000,
    seq: int = 32,
    d_model: int = 64,
    heads: int = 4,
    ff: int = 128,
    blocks: int = 2,
    batch: int = 16,
    classes: int = 10,
    seed: int = 0,
) -> Workload:
    """Realistic: a small Transformer encoder classifier (embedding gradients arrive as IndexedSlices)."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, d_model)(tokens)
    for _ in range(blocks):
        a = keras.layers.MultiHeadAttention(heads, d_model // heads)(h, h)
        h = keras.layers.LayerNormalization()(h + a)
        f = keras.layers.Dense(ff, activation="gelu")(h)
        f = keras.layers.Dense(d_model)(f)
        h = keras.layers.LayerNormalization()(h + f)
    out = keras.layers.Dense(classes)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(tokens, out)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(0, vocab, (batch, seq)), tf.int32)
    y = tf.constant(rng.integers(0, classes, (batch,)), tf.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return Workload("transformer", model, keras.optimizers.Adam(1e-4), x, y, loss)


def wide(n_variables: int, size: int = 8, batch: int = 4, seed: int = 0) -> Workload:
    """Many variables, little compute: the shape that stresses per-variable export and memory."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size,))
    parts = [keras.layers.Dense(1, use_bias=False, name=f"w{i}")(inputs) for i in range(n_variables)]
    out = keras.layers.Add()(parts) if n_variables > 1 else parts[0]
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((batch, size)), tf.float32)
    y = tf.constant(rng.standard_normal((batch, 1)), tf.float32)
    return Workload(f"wide_{n_variables}", model, keras.optimizers.SGD(1e-3), x, y, keras.losses.MeanSquaredError())


def tiny(seed: int = 0) -> Workload:
    """The long-run memory probe: a step so cheap that per-step leaks would show in RSS."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((4, 8)), tf.float32)
    y = tf.constant(rng.standard_normal((4, 1)), tf.float32)
    return Workload("tiny", model, keras.optimizers.Adam(1e-3), x, y, keras.losses.MeanSquaredError())


BUILDERS: dict[str, Callable[[], Workload]] = {"deep_mlp": deep_mlp, "transformer": transformer}


def eager_step(w: Workload, extra: Callable[[list[Any]], None] | None = None) -> Callable[[], tf.Tensor]:
    """One custom-loop step: forward, tape gradient, ``optimizer.apply``. ``extra`` sees the gradients
    (inside the step when the step is traced, so it becomes part of the graph)."""
    variables = w.model.trainable_variables
    w.optimizer.build(variables)

    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = w.loss(w.y, w.model(w.x, training=True))
        grads = tape.gradient(loss, variables)
        if extra is not None:
            extra(grads)
        w.optimizer.apply(grads, variables)
        return loss

    return step


def graph_step(w: Workload, extra: Callable[[list[Any]], None] | None = None) -> Callable[[], tf.Tensor]:
    """The same step as ``eager_step``, in its own ``tf.function`` (traced on first call)."""
    return tf.function(eager_step(w, extra))


def grads_returning_step(w: Workload) -> Callable[[], tuple[tf.Tensor, list[tf.Tensor]]]:
    """A traced step that also returns its gradients (what a naive per-variable-norm callback needs)."""
    variables = w.model.trainable_variables
    w.optimizer.build(variables)

    @tf.function
    def step() -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = w.loss(w.y, w.model(w.x, training=True))
        grads = tape.gradient(loss, variables)
        w.optimizer.apply(grads, variables)
        return loss, [tf.convert_to_tensor(g) for g in grads]

    return step


def wide_update(n: int, instrumented: bool, name: str = "wide") -> tuple[Callable[[], Any], Any]:
    """A traced step over ``n`` variables of 8 elements: plain SGD by ``assign_sub``, plus, when instrumented,
    exactly what an instrumented optimizer's ``apply`` runs first, ``Handle.observe(grads, variables)``.

    Why not a Keras optimizer: tracing Keras's per-variable update graph for 10,000 variables takes minutes on this
    machine (about 25 s per 2,000 variables, measured), which is Keras's cost, not gradtel's. Returns the step
    (tf.function without autograph, traced on first call) and the handle (None when plain).
    """
    import gradtel

    variables = [tf.Variable(tf.zeros([8]), name=f"block{i // 8}/v{i % 8}") for i in range(n)]  # 8 per layer
    handle = None
    if instrumented:
        handle = gradtel.instrument(keras.optimizers.SGD(1e-3), name=name, start_exporter=False)
    x = tf.ones([8])
    counter = tf.Variable(0, dtype=tf.int64)

    def step() -> tf.Tensor:
        grads = [x * float(i % 7 + 1) for i in range(n)]
        if handle is not None:
            handle.observe(grads, variables)
        for v, g in zip(variables, grads, strict=True):
            v.assign_sub(1e-3 * g)
        return counter.assign_add(1)

    step.variables = variables  # type: ignore[attr-defined]  # keep them alive with the step
    return tf.function(step, autograph=False), handle
