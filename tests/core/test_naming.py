"""One naming function: the report, the series and the diagnosis's messages call a variable the same thing."""

from __future__ import annotations

import types
import warnings

import keras
import numpy as np
import tensorflow as tf

import gradtel
from gradtel.handle import MissingGradientWarning
from gradtel.naming import variable_path


def test_only_tensorflows_output_suffix_is_dropped() -> None:
    assert tf.Variable(1.0, name="v:1").name == "v:1:0"  # TensorFlow appends the op's output index
    assert variable_path(tf.Variable(1.0, name="v:1")) == "v:1"
    assert variable_path(tf.Variable(1.0, name="plain")) == "plain"
    assert variable_path(types.SimpleNamespace(name="v:1")) == "v:1"  # not TensorFlow's suffix: kept
    assert variable_path(types.SimpleNamespace(name="")) == "variable"
    layer = keras.layers.Dense(1, name="head")
    layer.build((None, 2))
    assert [variable_path(v) for v in layer.trainable_variables] == ["head/kernel", "head/bias"]


def test_report_and_diagnosis_name_a_suffixed_variable_alike() -> None:
    used, odd = tf.Variable([1.0, 2.0], name="used"), tf.Variable([3.0], name="odd:1")
    opt = keras.optimizers.SGD(0.1)
    handle = gradtel.instrument(opt, name="naming")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # eager: the first step arms the recorder, the second is diagnosed
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(used * np.float32(2.0))
                grads = tape.gradient(loss, [used, odd])
                opt.apply_gradients(zip(grads, [used, odd], strict=True))
        records = {r.name: r for r in handle.records()}
        assert set(records) == {"used", "odd:1"}
        assert records["odd:1"].state == "missing" and records["odd:1"].cause.category == "unused"
        assert "`odd:1` was not read during this step" in records["odd:1"].cause.explanation
        messages = [str(w.message) for w in caught if isinstance(w.message, MissingGradientWarning)]
        assert messages and "  - odd:1: unused: `odd:1`" in messages[-1]
    finally:
        gradtel.uninstrument(opt)
