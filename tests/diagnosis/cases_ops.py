"""Paths cut by an op: no gradient registered, an integer/bool edge, tf.stop_gradient, custom gradients."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tests.diagnosis.corpus import Expectation, Step, case

NONDIFF = "non_differentiable_op"
ALL_DENSE = {"hidden/kernel": NONDIFF, "hidden/bias": NONDIFF, "head/kernel": NONDIFF, "head/bias": NONDIFF}


def mlp(name: str = "mlp") -> keras.Model:
    """A tiny built model: 3 -> hidden(4) -> head(2)."""
    layers = [keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(2, name="head")]
    return keras.Sequential(layers, name=name)


def batch() -> tuple[tf.Tensor, tf.Tensor]:
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3)
    return tf.constant(x), tf.constant([0.0, 1.0, 1.0, 0.0])


@case(
    source="argmax used as the prediction inside the loss (SO: 'No gradients provided' with argmax)",
    both=Expectation(ALL_DENSE, op="ArgMax"),
)
def argmax_in_loss() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            logits = model(x)
            pred = tf.cast(tf.argmax(logits, axis=1), tf.float32)  # CULPRIT
            loss = tf.reduce_mean(tf.square(pred - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="accuracy used as the loss: equal(argmax(pred), labels) (tensorflow/tensorflow#1511 style)",
    both=Expectation(ALL_DENSE, op="ArgMax"),
)
def accuracy_as_loss() -> Step:
    model, (x, y) = mlp(), batch()
    labels = tf.cast(y, tf.int64)

    def step():
        with tf.GradientTape() as tape:
            logits = model(x)
            correct = tf.equal(tf.argmax(logits, axis=-1), labels)  # CULPRIT
            loss = 1.0 - tf.reduce_mean(tf.cast(correct, tf.float32))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tf.one_hot(tf.argmax(...)) to build a hard prediction for a dice loss",
    both=Expectation(ALL_DENSE, op="ArgMax"),
)
def one_hot_of_argmax() -> Step:
    model, (x, y) = mlp(), batch()
    target = tf.one_hot(tf.cast(y, tf.int32), 2)

    def step():
        with tf.GradientTape() as tape:
            logits = model(x)
            hard = tf.one_hot(tf.argmax(logits, axis=-1), depth=2)  # CULPRIT
            loss = 1.0 - tf.reduce_sum(hard * target) / tf.reduce_sum(hard + target)
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="custom Keras layer that quantises with tf.round (SO: gradients None after tf.round)",
    both=Expectation({"dense_in/kernel": NONDIFF, "dense_in/bias": NONDIFF}, op="Round"),
)
def round_in_custom_layer() -> Step:
    class Quantize(keras.layers.Layer):
        def call(self, inputs):
            return tf.round(inputs * 4.0) / 4.0  # CULPRIT

    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="dense_in"), Quantize(), keras.layers.Dense(1, name="dense_out")]
    )
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="cast to int32 inside a layer (pixel/bucket indices), cast back to float",
    both=Expectation({"dense_in/kernel": NONDIFF, "dense_in/bias": NONDIFF}, op="Cast"),
)
def cast_to_int_in_layer() -> Step:
    class Bucketize(keras.layers.Layer):
        def call(self, inputs):
            buckets = tf.cast(inputs * 10.0, tf.int32)  # CULPRIT
            return tf.cast(buckets, tf.float32) / 10.0

    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="dense_in"),
            Bucketize(),
            keras.layers.Dense(1, name="dense_out"),
        ]
    )
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="boolean mask by casting activations to bool",
    both=Expectation({"gate/kernel": NONDIFF, "gate/bias": NONDIFF}, op="Cast"),
)
def cast_to_bool_mask() -> Step:
    gate, value = keras.layers.Dense(3, name="gate"), keras.layers.Dense(3, name="value")
    x, y = batch()
    gate.build((None, 3))
    value.build((None, 3))

    def step():
        with tf.GradientTape() as tape:
            mask = tf.cast(gate(x), tf.bool)  # CULPRIT
            out = tf.where(mask, value(x), tf.zeros_like(x))
            loss = tf.reduce_mean(tf.square(tf.reduce_sum(out, 1) - y))
        variables = gate.trainable_variables + value.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tf.where(pred > 0.5, 1, 0) as a hard threshold inside the loss", both=Expectation(ALL_DENSE, op="Greater")
)
def where_threshold() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            prob = tf.sigmoid(model(x)[:, 0])
            hard = tf.where(prob > 0.5, 1, 0)  # CULPRIT
            loss = tf.reduce_mean(tf.abs(tf.cast(hard, tf.float32) - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="top-k indices used to select items (recommender 'gather top-k' bug)",
    both=Expectation({"scorer/kernel": NONDIFF, "scorer/bias": NONDIFF}, op="TopKV2"),
)
def topk_indices() -> Step:
    scorer = keras.layers.Dense(1, name="scorer")
    scorer.build((None, 3))
    x, _ = batch()

    def step():
        with tf.GradientTape() as tape:
            scores = scorer(x)[:, 0]
            best = tf.math.top_k(scores, k=2).indices  # CULPRIT
            loss = -tf.reduce_sum(tf.cast(best, tf.float32))
        return tape.gradient(loss, scorer.trainable_variables), scorer.trainable_variables

    return step


@case(source="tf.math.floor to compute a discrete bin in a regression loss", both=Expectation(ALL_DENSE, op="Floor"))
def floor_in_loss() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            binned = tf.math.floor(model(x)[:, 0] * 3.0)  # CULPRIT
            loss = tf.reduce_mean(tf.square(binned - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(source="tf.numpy_function computing the loss with NumPy/SciPy code", both=Expectation(ALL_DENSE, op="PyFunc"))
def numpy_function_loss() -> Step:
    model, (x, y) = mlp(), batch()

    def np_loss(pred, target):
        return np.mean((pred[:, 0] - target) ** 2).astype("float32")

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)
            loss = tf.numpy_function(np_loss, [pred, y], tf.float32)  # CULPRIT
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tf.image.convert_image_dtype to uint8 in a generator's output before a perceptual loss",
    both=Expectation({"decoder/kernel": NONDIFF, "decoder/bias": NONDIFF}, op="Cast"),
)
def image_to_uint8() -> Step:
    decoder = keras.layers.Dense(12, activation="sigmoid", name="decoder")
    decoder.build((None, 3))
    x, _ = batch()
    target = tf.fill((4, 2, 2, 3), 0.5)

    def step():
        with tf.GradientTape() as tape:
            image = tf.reshape(decoder(x), (4, 2, 2, 3))
            pixels = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)  # CULPRIT
            restored = tf.image.convert_image_dtype(pixels, tf.float32)
            loss = tf.reduce_mean(tf.square(restored - target))
        return tape.gradient(loss, decoder.trainable_variables), decoder.trainable_variables

    return step


@case(
    source="string formatting round trip (as_string / to_number) in a loss",
    both=Expectation({"head/kernel": NONDIFF, "head/bias": NONDIFF}, op="AsString"),
)
def string_round_trip() -> Step:
    head = keras.layers.Dense(1, name="head")
    head.build((None, 3))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            text = tf.strings.as_string(head(x)[:, 0], precision=3)  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.strings.to_number(text) - y))
        return tape.gradient(loss, head.trainable_variables), head.trainable_variables

    return step


@case(
    source="tf.stop_gradient on pretrained embeddings that were meant to be fine-tuned",
    both=Expectation({"embed/embeddings": "stop_gradient"}, op="StopGradient"),
)
def stop_gradient_on_embedding() -> Step:
    embed = keras.layers.Embedding(10, 3, name="embed")
    head = keras.layers.Dense(1, name="head")
    embed.build((None,))
    head.build((None, 3))
    ids = tf.constant([1, 2, 3, 4])
    y = tf.constant([0.0, 1.0, 1.0, 0.0])

    def step():
        with tf.GradientTape() as tape:
            vectors = tf.stop_gradient(embed(ids))  # CULPRIT
            loss = tf.reduce_mean(tf.square(head(vectors)[:, 0] - y))
        variables = embed.trainable_variables + head.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tf.custom_gradient whose grad_fn returns None (straight-through estimator written wrong)",
    both=Expectation({"hidden/kernel": NONDIFF, "hidden/bias": NONDIFF}, op="custom_gradient"),
)
def custom_gradient_returns_none() -> Step:
    @tf.custom_gradient
    def binarize(values):
        def grad(upstream):
            return None

        return tf.sign(values), grad

    model, (x, y) = mlp(), batch()
    hidden, head = model.layers

    def step():
        with tf.GradientTape() as tape:
            codes = binarize(hidden(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(head(codes)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="seed example 3: integer tensor mixed into the computation, the variable cast to int to match",
    both=Expectation({"y": NONDIFF}, op="Cast"),
)
def seed_integer_condition() -> Step:
    x = tf.constant(1)
    y = tf.Variable([1.0], name="y")

    def step():
        with tf.GradientTape() as tape:
            if x == 1:  # noqa: SIM108  (the seed's own shape)
                z = tf.cast(x * tf.cast(y, tf.int32), tf.float32)  # CULPRIT
            else:
                z = tf.constant([0.0])
        return tape.gradient(z, [y]), [y]

    return step
