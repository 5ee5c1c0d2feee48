"""model.fit with a custom train_step whose loss ignores the prediction: Keras raises while tracing the step.

The Keras guide "Customizing what happens in fit() with TensorFlow"
(https://keras.io/guides/custom_train_step_in_tensorflow/), first example: CustomModel(keras.Model) whose
train_step computes y_pred = self(x, training=True), a loss, gradients of self.trainable_variables, and
self.optimizer.apply(gradients, trainable_vars), trained with fit. With the bug of
tensorflow/tensorflow#43258 and the Stack Overflow answers it links ("ValueError: No gradients provided for any
variable": the loss was computed from the targets, not from the model's output): here the mean squared error is
taken between y and a copy of y.
Expected gradtel outcome: `gradtel check` exit 1; every variable missing with cause `loss_disconnected` at the
line that computes the loss (marked CULPRIT); the script dies of Keras's ValueError at trace time (exit 1), the
optimizer marked `raised`.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {
    "check_exit": 1,
    "run_exit": 1,
    "optimizers": 1,
    "stepping": 0,
    "raising": 1,
    "missing": {"dense/kernel": "loss_disconnected", "dense_1/bias": "loss_disconnected"},
}


class CustomModel(keras.Model):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            target = tf.identity(y)
            loss = keras.ops.mean(keras.ops.square(y - target))  # CULPRIT
        trainable_vars = self.trainable_variables
        gradients = tape.gradient(loss, trainable_vars)
        self.optimizer.apply(gradients, trainable_vars)
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_metric]


inputs = keras.Input(shape=(32,))
hidden = layers.Dense(8, activation="relu")(inputs)
outputs = layers.Dense(1)(hidden)
model = CustomModel(inputs, outputs)
model.compile(optimizer="adam")
x = np.random.random((64, 32))
y = np.random.random((64, 1))
model.fit(x, y, epochs=1, batch_size=16, verbose=0)
