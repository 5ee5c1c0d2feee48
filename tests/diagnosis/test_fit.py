"""model.fit (graph mode, jit on and off) and tf_keras: the optimizer is instrumented as gradtel does it."""

from __future__ import annotations

import inspect
import itertools
import os
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradtel.diagnosis import Diagnoser, Diagnosis
from gradtel.naming import variable_path


def culprit_line(code: Any) -> int:
    """The line marked ``# CULPRIT`` in a class's or function's source."""
    lines, first = inspect.getsourcelines(code)
    return first + next(i for i, line in enumerate(lines) if "# CULPRIT" in line)


def instrument_keras3(optimizer: keras.optimizers.Optimizer, diagnoser: Diagnoser, seen: list) -> None:
    original = optimizer.apply

    def apply(grads, trainable_variables=None):
        seen.append((diagnoser.diagnose(list(grads), list(trainable_variables)), list(trainable_variables)))
        return original(grads, trainable_variables)

    optimizer.apply = apply


class Snap(keras.layers.Layer):
    def call(self, inputs):
        return tf.round(inputs)  # CULPRIT


def data() -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(-1, 1, 24, dtype="float32").reshape(8, 3), np.ones((8, 1), "float32")


@pytest.mark.parametrize("jit", [False, True])
def test_keras3_fit_round_layer(diagnoser: Diagnoser, jit: bool) -> None:
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="pre"), Snap(), keras.layers.Dense(1, name="post")]
    )
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
    seen: list[tuple[Diagnosis, list]] = []
    instrument_keras3(model.optimizer, diagnoser, seen)
    model.fit(*data(), epochs=1, batch_size=4, verbose=0)

    assert seen, "apply was not traced"
    result, variables = seen[0]
    names = {variable_path(variables[i]): c for i, c in result.causes.items()}
    assert sorted(n.split("/", 1)[1] for n in names) == ["pre/bias", "pre/kernel"]
    for cause in names.values():
        assert (cause.category, cause.op) == ("non_differentiable_op", "Round")
        assert cause.location.endswith(f"{os.sep}test_fit.py:{culprit_line(Snap)}")


def test_keras3_fit_output_without_loss(diagnoser: Diagnoser) -> None:
    """An output without a loss, trained by fit: not_on_loss_path, read where the user connected the head (the
    fit line, the only user frame of the read, tells nothing)."""
    inputs = keras.Input((3,))
    trunk = keras.layers.Dense(4, name="trunk")(inputs)
    main = keras.layers.Dense(1, name="main")(trunk)
    aux = keras.layers.Dense(1, name="aux")(trunk)  # CULPRIT
    model = keras.Model(inputs, {"main": main, "aux": aux})
    model.compile(optimizer="sgd", loss={"main": "mse"})
    seen: list[tuple[Diagnosis, list]] = []
    instrument_keras3(model.optimizer, diagnoser, seen)
    x, y = data()
    model.fit(x, {"main": y}, epochs=1, batch_size=4, verbose=0)

    result, variables = seen[0]
    causes = {variable_path(variables[i]): c for i, c in result.causes.items()}
    assert {name: c.category for name, c in causes.items()} == dict.fromkeys(
        ["aux/kernel", "aux/bias"], "not_on_loss_path"
    )
    where = f"{os.sep}test_fit.py:{culprit_line(test_keras3_fit_output_without_loss)}"
    assert all(c.location.endswith(where) for c in causes.values()), causes


def test_keras3_fit_dead_relu_hint(diagnoser: Diagnoser) -> None:
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="hid"), keras.layers.Dense(1, name="out")]
    )
    model.compile(optimizer="sgd", loss="mse")
    seen: list[tuple[Diagnosis, list]] = []
    instrument_keras3(model.optimizer, diagnoser, seen)
    model.fit(*data(), epochs=1, batch_size=4, verbose=0)

    result, variables = seen[0]
    assert result.causes == {}
    hints = {variable_path(variables[i]): h.category for i, h in result.zero_hints.items()}
    assert {n.split("/", 1)[1]: c for n, c in hints.items()} == {
        "hid/kernel": "dead_activation",
        "hid/bias": "dead_activation",
    }


def test_tf_keras_fit_argmax_layer(diagnoser: Diagnoser) -> None:
    tf_keras = pytest.importorskip("tf_keras")

    class Hard(tf_keras.layers.Layer):
        def call(self, inputs):
            return tf.cast(tf.argmax(inputs, axis=-1), tf.float32)[:, None]  # CULPRIT

    model = tf_keras.Sequential(
        [tf_keras.layers.Dense(4, name="logits", input_shape=(3,)), Hard(), tf_keras.layers.Dense(1, name="scale")]
    )
    model.compile(optimizer="sgd", loss="mse")
    seen: list[tuple[Diagnosis, list]] = []
    original = model.optimizer.apply_gradients

    def apply_gradients(grads_and_vars, *args, **kwargs):
        pairs = list(grads_and_vars)
        variables = [v for _, v in pairs]
        seen.append((diagnoser.diagnose([g for g, _ in pairs], variables), variables))
        return original(pairs, *args, **kwargs)

    model.optimizer.apply_gradients = apply_gradients
    model.fit(*data(), epochs=1, batch_size=4, verbose=0)

    result, variables = seen[0]
    causes = {variable_path(variables[i]): c for i, c in result.causes.items()}
    assert sorted(causes) == ["logits/bias", "logits/kernel"]
    for cause in causes.values():
        assert (cause.category, cause.op) == ("non_differentiable_op", "ArgMax")
        assert cause.location.endswith(f"{os.sep}test_fit.py:{culprit_line(Hard)}")


_RUNS = itertools.count()


def _zero_causes(model: keras.Model, outputs: int = 1, unused: int = 0) -> dict[str, str]:
    """Fit one batch with the model's optimizer instrumented; the report's causes of its zero gradients. The last
    ``unused`` of the model's outputs have no loss (their variables' gradients are missing)."""
    import gradtel

    model.compile(optimizer="sgd", loss=["mse"] * outputs + [None] * unused)
    # A name of its own: the report holds every handle of the process, earlier tests' uninstrumented ones too
    handle = gradtel.instrument(model.optimizer, name=f"zero_causes_{next(_RUNS)}", start_exporter=False)
    y = [np.full((8, 1), 0.5, "float32")] * outputs + [np.zeros((8, 1), "float32")] * unused
    model.fit(np.full((8, 3), 10.0, "float32"), y if outputs > 1 else y[0], epochs=1, batch_size=8, verbose=0)
    ours = [v for v in gradtel.report()["variables"] if v["optimizer"] == handle.name]
    # by layer/variable (a Sequential's names start with the model's: sequential/hid/kernel)
    return {"/".join(v["name"].split("/")[-2:]): v["cause"]["category"] for v in ours if v["status"] == "zero"}


def test_a_saturated_output_is_not_blamed_on_the_relus_before_it(instrumented_cleanup: None) -> None:
    """Every gradient is exactly zero (the sigmoid saturates to 1.0 in float32) while every ReLU is active: the
    ReLU layers' structural hint is contradicted by the output layer's zero, whose path crosses no ReLU."""
    ones = {"kernel_initializer": "ones"}
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hid", **ones),
            keras.layers.Dense(1, activation="sigmoid", name="out", **ones),
        ]
    )
    assert float(model(np.full((1, 3), 10.0, "float32"))[0, 0]) == 1.0  # saturated, not a dead ReLU
    assert _zero_causes(model) == dict.fromkeys(["hid/kernel", "hid/bias", "out/kernel", "out/bias"], "other")


def test_a_dead_relu_keeps_its_cause_while_a_later_bias_trains(instrumented_cleanup: None) -> None:
    dead = {"kernel_initializer": "ones", "bias_initializer": keras.initializers.Constant(-1000.0)}
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hid", **dead),
            keras.layers.Dense(1, name="out"),
        ]
    )
    # out/kernel is zero because its input (the dead layer's output) is; out/bias gets a gradient
    assert _zero_causes(model) == dict.fromkeys(["hid/kernel", "hid/bias", "out/kernel"], "dead_activation")


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_a_zero_initialised_layer_after_a_live_relu_is_no_dead_relu(instrumented_cleanup: None, dropout: bool) -> None:
    """The head's kernel is all zero, so nothing reaches the ReLU layer; the ReLU is active, which the head's
    kernel shows: its gradient (the ReLU's output times the gradient arriving) is not zero. Through a Dropout too
    (a select that keeps zeros zero)."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hid", kernel_initializer="ones"),
            *([keras.layers.Dropout(0.5, seed=0)] if dropout else []),
            keras.layers.Dense(1, name="out", kernel_initializer="zeros"),
        ]
    )
    assert _zero_causes(model) == {"hid/kernel": "other", "hid/bias": "other"}


def test_a_softmax_saturated_to_one_hot_before_a_live_relu_is_no_dead_relu(instrumented_cleanup: None) -> None:
    """A Gumbel-softmax at a temperature near zero (ericjang/gumbel-softmax#2): its output is exactly one-hot, so
    nothing reaches the encoder; the decoder's ReLU after it is alive (its layer after it trains, kernel too)."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="enc", kernel_initializer=keras.initializers.RandomNormal(seed=0)),
            keras.layers.Lambda(lambda t: keras.ops.softmax(t * 1e6), name="cold_softmax"),
            keras.layers.Dense(4, activation="relu", name="dec", kernel_initializer="ones", bias_initializer="ones"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    assert _zero_causes(model) == {"enc/kernel": "other", "enc/bias": "other"}


def test_the_relu_named_dead_is_the_one_that_output_zeros(instrumented_cleanup: None) -> None:
    """Two ReLU layers, the first dead, the second alive on its bias: the first one's variables, and the second's
    kernel (which multiplies the dead output), are blamed on the first ReLU's line, not on the ReLU nearest the
    loss; the second's bias trains."""
    import gradtel

    first = keras.layers.Dense(4, activation="relu", kernel_initializer="ones", bias_initializer=_minus_1000)
    second = keras.layers.Dense(4, activation="relu", kernel_initializer="ones", bias_initializer="ones")
    head = keras.layers.Dense(1)
    optimizer = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(optimizer, name=f"zero_causes_{next(_RUNS)}", start_exporter=False)

    @tf.function
    def step(x: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            hidden = first(x)  # CULPRIT
            loss = tf.reduce_mean(tf.square(head(second(hidden)) - 0.5))
        variables = first.trainable_variables + second.trainable_variables + head.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))

    step(tf.fill((8, 3), 10.0))
    where = f"{os.sep}test_fit.py:{culprit_line(step.python_function)}"
    ours = [v for v in gradtel.report()["variables"] if v["optimizer"] == handle.name]
    zero = {v["name"]: (v["cause"]["category"], v["cause"]["location"]) for v in ours if v["status"] == "zero"}
    assert {name: (category, location.endswith(where)) for name, (category, location) in zero.items()} == dict.fromkeys(
        [first.kernel.path, first.bias.path, second.kernel.path], ("dead_activation", True)
    ), zero


_minus_1000 = keras.initializers.Constant(-1000.0)


@pytest.mark.parametrize("unused", [0, 1], ids=["all_present", "one_head_missing"])
def test_a_clipped_head_is_not_blamed_on_its_relu_while_another_head_trains(
    instrumented_cleanup: None, unused: int
) -> None:
    """The clip saturates (every output above 1): the clipped head's gradients are all zero, the other head's are
    not. The ReLU's witnesses are the layers used after it, not the whole step. With a head whose gradients are
    missing the trace is walked at once (its witnesses later, from the graph), without one the walk is deferred."""
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="relu", name="hid", kernel_initializer="ones")(inputs)
    raw = keras.layers.Dense(1, name="raw", kernel_initializer="ones")(hidden)
    clipped = keras.layers.Lambda(lambda t: keras.ops.clip(t, 0.0, 1.0), name="clip")(raw)
    heads = [clipped, keras.layers.Dense(1, name="reg")(inputs), keras.layers.Dense(1, name="aux")(inputs)]
    model = keras.Model(inputs, heads[: 2 + unused])
    expected = dict.fromkeys(["hid/kernel", "hid/bias", "raw/kernel", "raw/bias"], "other")
    assert _zero_causes(model, outputs=2, unused=unused) == expected


def test_a_saturated_tanh_after_a_live_relu_is_not_blamed_on_the_relu(instrumented_cleanup: None) -> None:
    """The layer right after the ReLU gets no gradient (its tanh is at exactly 1.0) while a head after the tanh
    does: the ReLU's witnesses are what lies between it and the next op that can zero a gradient."""
    ones = {"kernel_initializer": "ones"}
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hid", **ones),
            keras.layers.Dense(2, activation="tanh", name="sat", **ones),
            keras.layers.Dense(1, name="head"),
        ]
    )
    assert _zero_causes(model) == dict.fromkeys(["hid/kernel", "hid/bias", "sat/kernel", "sat/bias"], "other")


def test_a_relu_with_a_max_value_at_its_cap_is_no_dead_relu(instrumented_cleanup: None) -> None:
    """keras.layers.ReLU(max_value=1.0) is a Relu then a clip: with every unit above the cap the clip zeroes the
    gradient, and no layer between the two tells which did."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                4, name="pre", kernel_initializer="ones", bias_initializer=keras.initializers.Constant(50.0)
            ),
            keras.layers.ReLU(max_value=1.0),
            keras.layers.Dense(1, name="head"),
        ]
    )
    assert _zero_causes(model) == {"pre/kernel": "other", "pre/bias": "other"}


def test_a_dead_relu_followed_by_dropout_keeps_its_cause(instrumented_cleanup: None) -> None:
    """Keras's Dropout is a select: no op that can zero a gradient by saturation, so the layer after it witnesses;
    and it keeps zeros zero, so the kernel after it multiplies the dead output."""
    dead = {"kernel_initializer": "ones", "bias_initializer": keras.initializers.Constant(-1000.0)}
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hid", **dead),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1, name="out"),
        ]
    )
    # Dropout is where(mask, x * scale, 0): it keeps the dead output zero, so out/kernel is blamed on the ReLU too
    assert _zero_causes(model) == dict.fromkeys(["hid/kernel", "hid/bias", "out/kernel"], "dead_activation")


def _float_ids_into_embedding(sequential: bool) -> keras.Model:
    """A Dense layer's float scores used as token ids (keras#11157): Keras's Embedding casts them to int32, an op
    inside a library layer with no user frame of its own."""
    if sequential:
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4, name="scores"),
                keras.layers.Embedding(10, 2, name="embed"),  # SEQUENTIAL
                keras.layers.Flatten(),
                keras.layers.Dense(1, name="out"),
            ]
        )
    inputs = keras.Input((3,))
    embed = keras.layers.Embedding(10, 2, name="embed")
    tokens = embed(keras.layers.Dense(4, name="scores")(inputs))  # CONNECTED
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(keras.layers.Flatten()(tokens)))


@pytest.mark.parametrize("how", ["fit", "eager_loop", "sequential_fit"])
def test_a_cut_inside_a_library_layer_is_located_where_the_layer_was_connected(
    instrumented_cleanup: None, how: str
) -> None:
    """Not the ``model.fit`` (or ``model(x)``) line, the only user frame of the Cast's creation: where the user
    connected the Embedding in a functional model, or wrote it in a Sequential one."""
    import gradtel

    optimizer = keras.optimizers.SGD(0.1)
    handle = gradtel.instrument(optimizer, name=f"layer_site_{next(_RUNS)}", start_exporter=False)
    model = _float_ids_into_embedding(sequential=how == "sequential_fit")
    x, y = np.ones((8, 3), "float32"), np.ones((8, 1), "float32")
    if how == "eager_loop":
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    else:
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    marker = "# SEQUENTIAL" if how == "sequential_fit" else "# CONNECTED"
    lines, first = inspect.getsourcelines(_float_ids_into_embedding)
    where = f"{os.sep}test_fit.py:{first + next(i for i, line in enumerate(lines) if marker in line)}"
    ours = [v for v in gradtel.report()["variables"] if v["optimizer"] == handle.name and v["status"] == "missing"]
    causes = {v["name"]: (v["cause"]["category"], v["cause"]["op"], v["cause"]["location"]) for v in ours}
    assert sorted(name.split("/", 1)[-1] if how == "sequential_fit" else name for name in causes) == [
        "scores/bias",
        "scores/kernel",
    ], causes
    assert all(c[:2] == ("non_differentiable_op", "Cast") and c[2].endswith(where) for c in causes.values()), causes
