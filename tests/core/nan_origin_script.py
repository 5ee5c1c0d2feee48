import sys

import keras
import numpy as np
import tensorflow as tf

NAN_AT, STEPS = int(sys.argv[1]), int(sys.argv[2])
optimizer = keras.optimizers.Adam(1e-3)


class Scale(keras.layers.Layer):
    """y = x * c; c's gradient is made NaN at step NAN_AT (1-based), so Adam turns c into NaN and every gradient
    computed through it is NaN one step later."""

    def build(self, input_shape):
        self.c = self.add_weight(shape=(), initializer="ones", name="c")

    def call(self, x):
        @tf.custom_gradient
        def scaled(x, c):
            def grad(dy):
                gc = tf.reduce_sum(dy * x)
                poisoned = tf.equal(optimizer.iterations, NAN_AT - 1)
                return dy * c, tf.where(poisoned, tf.constant(np.nan, gc.dtype), gc)

            return x * c, grad

        return scaled(x, tf.convert_to_tensor(self.c))


inputs = keras.Input((8,))
hidden = keras.layers.Dense(16, activation="tanh", name="encoder")(inputs)
outputs = Scale(name="culprit")(keras.layers.Dense(1, name="head")(hidden))
model = keras.Model(inputs, outputs)
rng = np.random.default_rng(0)
x = tf.constant(rng.normal(size=(32, 8)).astype("float32"))
y = tf.constant(rng.normal(size=(32, 1)).astype("float32"))


@tf.function
def step():
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return loss


for _ in range(STEPS):
    step()
