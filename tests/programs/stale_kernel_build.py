"""A custom layer that normalises its kernel once in build(); call() uses that stale tensor, so the kernel never trains.

A weight-normalised Dense written as in the Keras guide "Making new layers and models via subclassing"
(https://keras.io/guides/making_new_layers_and_models_via_subclassing/: add_weight in build(), matmul in call()),
with the mistake of tensorflow/tensorflow#42167 (the value computed from the variable outside the GradientTape,
answer: "put the computation inside ... so that it fits in the scope of GradientTape"): the normalised kernel is
computed in build() and kept, so the training step uses a constant. Trained with compile/fit; the other layers
train, so Keras only warns.
Expected gradtel outcome: `gradtel check` exit 1; the layer's kernel missing with cause `outside_tape` at the
build() line that normalises it (marked CULPRIT); the script runs to the end (exit 0).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {
    "check_exit": 1,
    "run_exit": 0,
    "optimizers": 1,
    "stepping": 1,
    "missing": {"weight_norm_dense/kernel": "outside_tape"},
}


class WeightNormDense(layers.Layer):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="random_normal", name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")
        self.normalized_kernel = self.kernel / tf.norm(self.kernel, axis=0, keepdims=True)  # CULPRIT

    def call(self, inputs):
        return tf.matmul(inputs, self.normalized_kernel) + self.bias


model = keras.Sequential(
    [keras.Input(shape=(8,)), WeightNormDense(4, name="weight_norm_dense"), layers.ReLU(), layers.Dense(1)]
)
model.compile(optimizer="adam", loss="mse")
rng = np.random.default_rng(0)
model.fit(rng.random((32, 8)), rng.random((32, 1)), batch_size=8, epochs=1, verbose=0)
