"""Structural bugs: the loss, the tape or the variable list is wrong, or the path leaves TensorFlow."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tests.diagnosis.cases_ops import batch, mlp
from tests.diagnosis.corpus import Expectation, Step, case


def every(model: keras.Model, category: str) -> dict[str, str]:
    """Expect ``category`` for every trainable variable of ``model`` (by path suffix)."""
    return {"/".join(v.path.split("/")[-2:]): category for v in model.trainable_variables}


@case(
    source="seed example 2: the loss is computed from y_true only",
    both=Expectation({"seed_dense/kernel": "loss_disconnected", "seed_dense/bias": "loss_disconnected"}),
)
def seed_loss_from_y_true() -> Step:
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="seed_dense")])
    x, y_true = tf.constant([[1.0]]), tf.constant([[2.0]])

    def step():
        with tf.GradientTape() as tape:
            model(x)
            loss = tf.reduce_sum(y_true)  # CULPRIT
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="seed example 1: a tf.Variable created with trainable=False",
    both=Expectation({"frozen_v": "not_trainable"}, located=False),
)
def seed_variable_not_trainable() -> Step:
    v = tf.Variable([1.0, 2.0], trainable=False, name="frozen_v")

    def step():
        with tf.GradientTape() as tape:
            y = v * 2.0
        return [tape.gradient(y, v)], [v]

    return step


@case(
    source="custom layer weight created with add_weight(trainable=False), all weights given to the tape",
    both=Expectation({"calibrated/scale": "not_trainable"}, located=False),
)
def non_trainable_weight_passed() -> Step:
    class Calibrated(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel")
            self.scale = self.add_weight(shape=(), initializer="ones", trainable=False, name="scale")

        def call(self, inputs):
            return tf.matmul(inputs, self.kernel) * self.scale

    layer = Calibrated(name="calibrated")
    x, y = batch()
    layer(x)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x)[:, 0] - y))
        return tape.gradient(loss, layer.weights), layer.weights

    return step


@case(
    source="an int32 step counter kept with the trainable variables",
    both=Expectation({"step_counter": "integer_dtype"}, located=False),
)
def integer_variable() -> Step:
    scale = tf.Variable(1.5, name="scale")
    counter = tf.Variable(0, name="step_counter")
    x = tf.constant([1.0, 2.0])

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(x * scale) + tf.cast(counter, tf.float32)
        variables = [scale, counter]
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="multi-output model where only one output has a loss ('Gradients do not exist for variables')",
    both=Expectation({"aux_head/kernel": "not_on_loss_path", "aux_head/bias": "not_on_loss_path"}),
)
def unused_output_head() -> Step:
    inputs = keras.Input((3,))
    trunk = keras.layers.Dense(4, name="trunk")(inputs)
    main = keras.layers.Dense(1, name="main_head")(trunk)
    aux = keras.layers.Dense(2, name="aux_head")(trunk)
    model = keras.Model(inputs, [main, aux])
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            main_out, _aux_out = model(x)  # CULPRIT
            loss = tf.reduce_mean(tf.square(main_out[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="an auxiliary head evaluated only for a metric inside the tape",
    both=Expectation({"probe/kernel": "not_on_loss_path", "probe/bias": "not_on_loss_path"}),
)
def value_used_only_for_metric() -> Step:
    model, (x, y) = mlp(), batch()
    probe = keras.layers.Dense(1, name="probe")
    probe.build((None, 3))

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
            probe_error = tf.reduce_mean(tf.abs(probe(x)[:, 0] - y))  # CULPRIT
        variables = model.trainable_variables + probe.trainable_variables
        grads = tape.gradient(loss, variables)
        del probe_error
        return grads, variables

    return step


@case(
    source="GAN: generator loss computed on the discriminator's output for REAL images",
    both=Expectation({"gen_dense/kernel": "not_on_loss_path", "gen_dense/bias": "not_on_loss_path"}),
)
def gan_loss_on_wrong_output() -> Step:
    generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="gen_dense")])
    discriminator = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="disc_dense")])
    noise, (real, _) = tf.ones((4, 2)), batch()
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def step():
        with tf.GradientTape() as tape:
            fake = generator(noise)  # CULPRIT
            fake_logits = discriminator(fake)
            real_logits = discriminator(real)
            gen_loss = bce(tf.ones_like(real_logits), real_logits)
        del fake_logits
        grads = tape.gradient(gen_loss, generator.trainable_variables)
        return grads, generator.trainable_variables

    return step


@case(
    source="another model's variables given to tape.gradient (copy-paste of a two-model loop)",
    both=Expectation(
        {
            "other/hidden/kernel": "unused",
            "other/hidden/bias": "unused",
            "other/head/kernel": "unused",
            "other/head/bias": "unused",
        },
        located=False,
    ),
)
def other_models_variables() -> Step:
    model, other, (x, y) = mlp("model"), mlp("other"), batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, other.trainable_variables), other.trainable_variables

    return step


@case(
    source="subclassed model: a layer created and built in __init__ but never called in call()",
    both=Expectation({"forgotten/kernel": "unused", "forgotten/bias": "unused"}, located=False),
)
def layer_never_called() -> Step:
    class TwoTower(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.Dense(1, name="used")
            self.forgotten = keras.layers.Dense(1, name="forgotten")

        def call(self, inputs):
            return self.used(inputs)

    model = TwoTower()
    model(tf.ones((1, 3)))
    model.forgotten.build((None, 3))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tf.Module that re-creates its tf.Variable on every call; the optimizer holds the first one",
    eager=Expectation({"recreated": "unused"}, located=False),
)
def variable_recreated_each_call() -> Step:
    class Scale(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(2.0, name="recreated")

        def __call__(self, inputs):
            self.w = tf.Variable(2.0, name="recreated")
            return inputs * self.w

    layer = Scale()
    variables = [layer.w]
    x = tf.constant([1.0, 2.0])

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tf.cond chooses a head; in eager only the taken branch runs, the other head is not read",
    eager=Expectation({"head_b/kernel": "unused", "head_b/bias": "unused"}, located=False),
    graph=Expectation(
        {},
        zero_hints={
            "head_b/kernel": "untaken_branch",
            "head_b/bias": "untaken_branch",
            "head_a/kernel": "untaken_branch",
            "head_a/bias": "untaken_branch",
        },
    ),
)
def cond_branch_not_taken() -> Step:
    head_a, head_b = keras.layers.Dense(1, name="head_a"), keras.layers.Dense(1, name="head_b")
    head_a.build((None, 3))
    head_b.build((None, 3))
    x, y = batch()
    use_a = tf.constant(True)

    def step():
        with tf.GradientTape() as tape:
            out = tf.cond(use_a, lambda: head_a(x), lambda: head_b(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(out[:, 0] - y))
        variables = head_a.trainable_variables + head_b.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="forward pass run before entering the GradientTape",
    both=Expectation(
        {
            "hidden/kernel": "outside_tape",
            "hidden/bias": "outside_tape",
            "head/kernel": "outside_tape",
            "head/bias": "outside_tape",
        }
    ),
)
def forward_pass_outside_tape() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        pred = model(x)  # CULPRIT
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(pred[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="part of the model run under tape.stop_recording() to 'save memory'",
    both=Expectation({"hidden/kernel": "outside_tape", "hidden/bias": "outside_tape"}),
)
def stop_recording_block() -> Step:
    model, (x, y) = mlp(), batch()
    hidden, head = model.layers

    def step():
        with tf.GradientTape() as tape:
            with tape.stop_recording():
                features = hidden(x)  # CULPRIT
            loss = tf.reduce_mean(tf.square(head(features)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="GradientTape(watch_accessed_variables=False) and only the output layer is watched",
    both=Expectation({"w_hidden": "outside_tape"}),
)
def tape_not_watching() -> Step:
    w_hidden = tf.Variable(tf.ones((3, 4)), name="w_hidden")
    w_out = tf.Variable(tf.ones((4, 1)), name="w_out")
    x, y = batch()

    def step():
        with tf.GradientTape(watch_accessed_variables=False) as tape:  # CULPRIT: the tape watches only w_out
            tape.watch(w_out)
            hidden = tf.tanh(tf.matmul(x, w_hidden))
            loss = tf.reduce_mean(tf.square(tf.matmul(hidden, w_out)[:, 0] - y))
        variables = [w_hidden, w_out]
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="weight normalisation computed once in build(); call() uses the stale tensor",
    eager=Expectation({"wn_dense/kernel": "outside_tape"}),
)
def tensor_precomputed_in_build() -> Step:
    class WeightNormDense(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel")
            self.unit_kernel = self.kernel / tf.norm(self.kernel)  # CULPRIT

        def call(self, inputs):
            return tf.matmul(inputs, self.unit_kernel)

    layer = WeightNormDense(name="wn_dense")
    x, y = batch()
    layer(x)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x)[:, 0] - y))
        return tape.gradient(loss, layer.trainable_variables), layer.trainable_variables

    return step


@case(
    source="Variable.assign in the forward pass (a 'state' variable updated then read back)",
    both=Expectation({"proj/kernel": "stateful_assign"}, op="AssignVariableOp"),
)
def assign_in_forward_pass() -> Step:
    class Stateful(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel")
            self.state = self.add_weight(shape=(4, 1), initializer="zeros", trainable=False, name="state")

        def call(self, inputs):
            self.state.assign(tf.matmul(inputs, self.kernel))  # CULPRIT
            return self.state * 1.0

    layer = Stateful(name="proj")
    x, y = batch()
    layer(x)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x)[:, 0] - y))
        return tape.gradient(loss, layer.trainable_variables), layer.trainable_variables

    return step


@case(
    source="predictions converted with .numpy() inside the tape to compute the loss",
    eager=Expectation(
        {
            "hidden/kernel": "left_tensorflow",
            "hidden/bias": "left_tensorflow",
            "head/kernel": "left_tensorflow",
            "head/bias": "left_tensorflow",
        }
    ),
)
def numpy_inside_tape() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            pred = model(x).numpy()  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.constant(pred[:, 0]) - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="loss computed with NumPy maths on the model output",
    eager=Expectation(
        {
            "hidden/kernel": "left_tensorflow",
            "hidden/bias": "left_tensorflow",
            "head/kernel": "left_tensorflow",
            "head/bias": "left_tensorflow",
        }
    ),
)
def numpy_maths_loss() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)
            loss = np.mean(np.square(pred[:, 0] - y))  # CULPRIT
        return tape.gradient(tf.constant(loss), model.trainable_variables), model.trainable_variables

    return step


@case(
    source="model.predict called inside the GradientTape (SO: 'No gradients provided' with predict)",
    eager=Expectation(
        {
            "hidden/kernel": "left_tensorflow",
            "hidden/bias": "left_tensorflow",
            "head/kernel": "left_tensorflow",
            "head/bias": "left_tensorflow",
        }
    ),
)
def predict_inside_tape() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            pred = model.predict(x, verbose=0)  # CULPRIT
            loss = tf.reduce_mean(tf.square(pred[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step
