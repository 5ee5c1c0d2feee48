"""layer_sites: where Keras layers were written and connected; the wrappers leave Keras's behaviour alone, come off
when the last diagnoser goes, and keep a table bounded by the live layers."""

from __future__ import annotations

import gc
import inspect

import keras
import pytest
import tensorflow as tf

from gradtel.diagnosis import layer_sites


@pytest.fixture
def sites():
    layer_sites.install()
    yield layer_sites
    layer_sites.uninstall()


class _Scaled(keras.layers.Layer):
    """No __init__ of its own: Keras reads its constructor arguments from the base's (wrapped) one."""

    def call(self, inputs):
        return inputs * 2.0


def test_written_and_connected_lines(sites) -> None:
    dense = keras.layers.Dense(2, name="site_dense")
    written = f"{__file__}:{inspect.currentframe().f_lineno - 1}"
    assert sites.site_of_layer(dense) == written
    dense(keras.Input((3,)))
    connected = f"{__file__}:{inspect.currentframe().f_lineno - 1}"
    assert sites.site_of_layer(dense) == connected
    dense(keras.Input((3,)))  # connected twice (a shared layer): the line that wrote it
    assert sites.site_of_layer(dense) == written


def test_keras_still_reads_the_constructor_arguments(sites) -> None:
    layer = _Scaled(name="scaled_site", dtype="float32")
    assert layer.get_config()["name"] == "scaled_site"
    assert type(layer).from_config(layer.get_config()).name == "scaled_site"


def test_the_last_uninstall_unwraps() -> None:
    held = layer_sites._users  # diagnosers earlier tests left installed: released here, held again after
    for _ in range(held):
        layer_sites.uninstall()
    try:
        original = keras.layers.Layer.__dict__["__init__"]
        layer_sites.install()
        layer_sites.install()  # a second diagnoser
        layer_sites.uninstall()
        assert keras.layers.Layer.__dict__["__init__"] is not original  # still held by the first
        layer_sites.uninstall()
        assert keras.layers.Layer.__dict__["__init__"] is original
    finally:
        for _ in range(held):
            layer_sites.install()


def test_the_table_stays_bounded_by_the_live_layers(sites) -> None:
    for i in range(3000):  # distinct names that never recur, each layer dropped at once
        keras.layers.Dense(1, name=f"throwaway_{i}")
    gc.collect()
    assert len(layer_sites._sites) <= 2 * layer_sites._PRUNE_FLOOR + 1


def _traced_relu_step(diagnoser):
    """A Sequential model's step traced, its zero hints deferred; only the graph outlives this function."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="gone_hidden"),
            keras.layers.ReLU(),  # RELU
            keras.layers.Dense(1, name="gone_out"),
        ]
    )
    box = {}

    @tf.function
    def traced(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        box["result"] = diagnoser.diagnose(list(grads), list(model.trainable_variables))

    traced(tf.ones((2, 3)))
    return box["result"], traced.get_concrete_function(tf.ones((2, 3))).graph


def test_a_deferred_hint_names_the_layer_after_the_model_is_gone(diagnoser) -> None:
    """A trace's zero hints are worked out when a zero shows up, maybe after the model was dropped (its layers'
    weak references dead): the layer's line still stands, as the only layer of that name."""
    result, graph = _traced_relu_step(diagnoser)
    gc.collect()
    lines, first = inspect.getsourcelines(_traced_relu_step)
    where = f"{__file__}:{first + next(i for i, line in enumerate(lines) if '# RELU' in line)}"
    assert {hint.location for hint in result.zero_hints.values()} == {where}
    del graph
