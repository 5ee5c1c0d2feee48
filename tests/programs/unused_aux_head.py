"""A two-headed model trained by a custom tf.function loop whose loss uses only the main head.

The Keras guide "Writing a training loop from scratch in TensorFlow"
(https://keras.io/guides/writing_a_custom_training_loop_in_tensorflow/): a functional model, a @tf.function
train_step with a GradientTape, loss_fn, optimizer.apply(grads, model.trainable_weights), a tf.data loop; the
model has an auxiliary (projection) head whose output the loss never uses, the situation of
google-research/simclr#105 and tensorflow/tensorflow#42542 ("Gradients do not exist for variables ... when
minimizing the loss"): the head is computed in the tape, then dropped.
Expected gradtel outcome: `gradtel check` exit 1; the aux head's kernel and bias missing with cause
`not_on_loss_path` at the line that runs the model (and so reads the head) in the tape (marked CULPRIT); the
script runs to the end (exit 0).
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
    "missing": {"aux_projection/kernel": "not_on_loss_path", "aux_projection/bias": "not_on_loss_path"},
}

inputs = keras.Input(shape=(16,), name="digits")
x1 = layers.Dense(16, activation="relu")(inputs)
x2 = layers.Dense(16, activation="relu")(x1)
outputs = layers.Dense(10, name="predictions")(x2)
aux = layers.Dense(4, name="aux_projection")(x2)
model = keras.Model(inputs=inputs, outputs=[outputs, aux])

optimizer = keras.optimizers.SGD(learning_rate=1e-3)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
train_acc_metric = keras.metrics.SparseCategoricalAccuracy()


@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        logits, projection = model(x, training=True)  # CULPRIT
        loss_value = loss_fn(y, logits)
    grads = tape.gradient(loss_value, model.trainable_weights)
    optimizer.apply(grads, model.trainable_weights)
    train_acc_metric.update_state(y, logits)
    return loss_value


rng = np.random.default_rng(0)
x_train = rng.random((48, 16)).astype("float32")
y_train = rng.integers(0, 10, 48)
train_dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(buffer_size=48).batch(16)
for epoch in range(1):
    for step, (x_batch_train, y_batch_train) in enumerate(train_dataset):
        loss_value = train_step(x_batch_train, y_batch_train)
