"""Model pieces that reproduce real Keras pitfalls, shared by the diagnosis and the report tests."""

from __future__ import annotations

import keras
import tensorflow as tf


class UntrackedScale(keras.layers.Layer):
    """tf.Variables kept in a Python list on a Keras 3 layer are not tracked, so no optimizer ever gets them."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel")
        self.extras = [tf.Variable(2.0, name="untracked_scale")]

    def call(self, inputs):
        return tf.matmul(inputs, self.kernel) * self.extras[0]
