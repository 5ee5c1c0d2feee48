"""The Diagnoser's contract: eager recording bounds and arming, caching, not_optimized, robustness."""

from __future__ import annotations

import json

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import backprop, context
from tensorflow.python.framework import ops
from tensorflow.python.ops import resource_variable_ops

from gradtel.diagnosis import Cause, Diagnoser
from gradtel.naming import variable_path
from gradtel.vocabulary import MISSING_CAUSES
from tests.pitfalls import UntrackedScale


def two_heads() -> tuple[keras.layers.Dense, keras.layers.Dense]:
    a, b = keras.layers.Dense(1, name="a"), keras.layers.Dense(1, name="b")
    a.build((None, 3))
    b.build((None, 3))
    return a, b


def eager_step(diagnoser: Diagnoser, heads, use_b: bool):
    x = tf.ones((2, 3))
    a, b = heads
    with tf.GradientTape() as tape:
        out = a(x) + (b(x) if use_b else 0.0)
        loss = tf.reduce_mean(out)
    variables = a.trainable_variables + b.trainable_variables
    grads = tape.gradient(loss, variables)
    return diagnoser.diagnose(list(grads), variables)


def test_recorder_disarms_after_a_clean_step_and_stops_growing(diagnoser: Diagnoser) -> None:
    heads = two_heads()
    assert diagnoser.recording
    first = eager_step(diagnoser, heads, use_b=True)
    assert first.causes == {} and not diagnoser.recording
    size = len(diagnoser._recorder.graph)
    for _ in range(5):
        assert eager_step(diagnoser, heads, use_b=True) is first
    assert len(diagnoser._recorder.graph) == size


def test_new_missing_set_is_recorded_on_the_next_step(diagnoser: Diagnoser) -> None:
    heads = two_heads()
    eager_step(diagnoser, heads, use_b=True)
    pending = eager_step(diagnoser, heads, use_b=False)
    assert {c.category for c in pending.causes.values()} == {"unknown"} and diagnoser.recording
    full = eager_step(diagnoser, heads, use_b=False)
    assert sorted(c.category for c in full.causes.values()) == ["unused", "unused"]
    assert not diagnoser.recording
    assert eager_step(diagnoser, heads, use_b=False) is full


def test_a_trace_lifts_the_op_callback_and_eager_recording_goes_on(diagnoser: Diagnoser) -> None:
    """While an op callback is registered TensorFlow serialises every op it builds to offer it, and the recorder
    ignores graph ops: it lifts its callback while a function traces, puts it back after, and still records."""
    traced_with: list[list] = []

    @tf.function
    def double(x: tf.Tensor) -> tf.Tensor:
        traced_with.append(list(context.context().op_callbacks))  # runs while tracing only
        return x * 2.0

    assert diagnoser.recording
    double(tf.ones(2))
    assert traced_with == [[]]
    assert diagnoser._recorder._on_op in context.context().op_callbacks
    full = eager_step(diagnoser, two_heads(), use_b=False)
    assert sorted(c.category for c in full.causes.values()) == ["unused", "unused"]


def test_recording_is_bounded() -> None:
    diagnoser = Diagnoser(max_recorded_ops=64)
    diagnoser.install()
    try:
        v = tf.Variable(1.0)
        with tf.GradientTape() as tape:
            y = v
            for _ in range(200):
                y = y * 1.0001
        diagnoser.diagnose([tape.gradient(y, v)], [v])
        assert len(diagnoser._recorder.graph) <= 64
    finally:
        diagnoser.uninstall()


def test_graph_diagnosis_is_cached_per_trace(diagnoser: Diagnoser) -> None:
    a, b = two_heads()
    results = []

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(a(x))
        variables = a.trainable_variables + b.trainable_variables
        grads = tape.gradient(loss, variables)
        results.append(diagnoser.diagnose(list(grads), variables))
        return loss

    step(tf.ones((2, 3)))
    step(tf.ones((2, 3)))
    assert len(results) == 1
    assert [c.category for c in results[0].causes.values()] == ["unused", "unused"], results[0].causes


def test_not_optimized_names_plain_variables_in_a_python_list(diagnoser: Diagnoser) -> None:
    layer = UntrackedScale(name="scaled")
    layer(tf.ones((1, 3)))
    assert [variable_path(v) for v in layer.trainable_variables] == ["scaled/kernel"]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(layer(tf.ones((2, 3))))
    grads = tape.gradient(loss, layer.trainable_variables)
    diagnoser.diagnose(list(grads), layer.trainable_variables)
    assert diagnoser.not_optimized(layer.trainable_variables) == [("scaled/untracked_scale", False)]
    assert diagnoser.not_optimized([*layer.trainable_variables, *layer.extras]) == []


class _Affine(tf.Module):
    def __init__(self) -> None:
        super().__init__(name="affine")
        self.shift = tf.Variable(0.5, name="module_shift")


class _HoldsAModule(keras.layers.Layer):
    """tensorflow/probability#946: a Keras 3 layer holding a tf.Module; Keras 3 tracks neither it nor its variables."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel")
        self.affine = _Affine()

    def call(self, inputs):
        return tf.matmul(inputs, self.kernel) + self.affine.shift


def test_not_optimized_names_variables_of_a_tf_module_held_by_a_keras3_layer_untracked(diagnoser: Diagnoser) -> None:
    layer = _HoldsAModule(name="holder")
    layer(tf.ones((1, 3)))
    assert [variable_path(v) for v in layer.trainable_variables] == ["holder/kernel"]  # the premise
    standalone = _Affine()  # a tf.Module the script holds itself: its choice, only a note
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(layer(tf.ones((2, 3)))) * standalone.shift
    diagnoser.diagnose(list(tape.gradient(loss, layer.trainable_variables)), layer.trainable_variables)
    expected = [("holder/module_shift", False), ("module_shift", True)]  # untracked; a note
    assert diagnoser.not_optimized(layer.trainable_variables) == expected


def test_not_optimized_leaves_out_a_frozen_keras3_layer_but_names_an_assigned_target(diagnoser: Diagnoser) -> None:
    """The keras.io transfer-learning recipe (``base.trainable = False``): the tape still watches the tf.Variables
    inside the frozen Keras 3 variables (they stay trainable), but the program said the exclusion is intended. A
    target network's trainable variables, given to no optimizer, keep their note."""
    base = keras.layers.Dense(2, name="base")
    target = keras.layers.Dense(1, name="target")
    head = keras.layers.Dense(1, name="head")
    x = tf.ones((2, 3))
    head(base(x)), target(base(x))
    base.trainable = False
    with tf.GradientTape() as tape:
        features = base(x)
        loss = tf.reduce_mean(head(features)) + tf.reduce_mean(target(features))
    diagnoser.diagnose(list(tape.gradient(loss, head.trainable_variables)), head.trainable_variables)
    assert diagnoser.not_optimized(head.trainable_variables) == [("target/bias", True), ("target/kernel", True)]


def test_not_optimized_leaves_out_a_frozen_tf_keras_model(diagnoser: Diagnoser) -> None:
    """tf_keras's ``model.trainable = False`` never changes its tf.Variables' ``trainable`` (a frozen feature
    extractor, keras#8585's discriminator): the program said so, no note."""
    import tf_keras

    base = tf_keras.Sequential([tf_keras.layers.Dense(2, name="frozen_base", input_shape=(3,))])
    head = tf_keras.layers.Dense(1, name="tfk_head")
    x = tf.ones((2, 3))
    head(base(x))
    base.trainable = False
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(head(base(x)))
    diagnoser.diagnose(list(tape.gradient(loss, head.trainable_variables)), head.trainable_variables)
    assert base.layers[0].kernel.trainable  # the premise: the tape watched it
    assert diagnoser.not_optimized(head.trainable_variables) == []


def test_diagnose_never_raises_and_reports_unknown(diagnoser: Diagnoser) -> None:
    result = diagnoser.diagnose([None, np.zeros(2)], ["not a variable", object()])
    assert list(result.causes) == [0]
    assert result.causes[0].category in MISSING_CAUSES


def test_cause_to_dict_is_json_ready() -> None:
    cause = Cause("stop_gradient", "StopGradient", "train.py:3", "x")
    assert json.loads(json.dumps(cause.to_dict())) == {
        "category": "stop_gradient",
        "op": "StopGradient",
        "location": "train.py:3",
        "explanation": "x",
    }


def test_uninstall_restores_every_patch() -> None:
    before = (
        backprop.GradientTape.gradient,
        backprop.GradientTape._push_tape,
        ops._EagerTensorBase.numpy,
        ops._EagerTensorBase.__array__,
    )
    diagnoser = Diagnoser()
    diagnoser.install()
    assert backprop.GradientTape.gradient is not before[0]
    diagnoser.uninstall()
    after = (
        backprop.GradientTape.gradient,
        backprop.GradientTape._push_tape,
        ops._EagerTensorBase.numpy,
        ops._EagerTensorBase.__array__,
    )
    assert after == before
    assert "__getattribute__" not in resource_variable_ops.BaseResourceVariable.__dict__
