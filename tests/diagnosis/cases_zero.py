"""Gradients that are present but would be zero: the hint must name the likely cause."""

from __future__ import annotations

import keras
import tensorflow as tf

from tests.diagnosis.cases_ops import batch, mlp
from tests.diagnosis.corpus import Expectation, Step, case


@case(
    source="tf.sign as a binarizer in the forward pass: gradient is zero almost everywhere",
    both=Expectation({}, zero_hints={"hidden/kernel": "zero_gradient_op", "hidden/bias": "zero_gradient_op"}),
)
def sign_binarizer() -> Step:
    model, (x, y) = mlp(), batch()
    hidden, head = model.layers

    def step():
        with tf.GradientTape() as tape:
            codes = tf.sign(hidden(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(head(codes)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="ReLU hidden layer: if every unit dies the kernel's gradient is all zero",
    both=Expectation({}, zero_hints={"relu_hidden/kernel": "dead_activation", "relu_hidden/bias": "dead_activation"}),
)
def relu_hidden_layer() -> Step:
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="relu_hidden"),
            keras.layers.ReLU(),  # CULPRIT: the layer's line, not the model call's (a library model runs it)
            keras.layers.Dense(1, name="linear_out"),
        ]
    )
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)
            loss = tf.reduce_mean(tf.square(pred[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="float16 variables trained without loss scaling",
    both=Expectation({}, located=False, zero_hints={"w16": "underflow"}),
)
def float16_without_loss_scaling() -> Step:
    w = tf.Variable(tf.ones((3,), tf.float16), name="w16")
    x = tf.constant([1e-4, 2e-4, 3e-4], tf.float16)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(w * x) * tf.constant(1e-4, tf.float16)
        return tape.gradient(loss, [w]), [w]

    return step
