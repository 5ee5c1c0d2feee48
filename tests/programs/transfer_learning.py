"""Transfer learning: a frozen base model (base_model.trainable = False) under a new head, trained with fit.

Adapted from the Keras guide "Transfer learning & fine-tuning" (https://keras.io/guides/transfer_learning/), the
end-to-end example: base_model with include_top=False, base_model.trainable = False, a new model whose base is
called with training=False, GlobalAveragePooling2D, Dropout and a Dense(1) head, Adam and
BinaryCrossentropy(from_logits=True), then the fine-tuning round (base_model.trainable = True, recompile with
Adam(1e-5), fit again). A tiny random-weight CNN replaces Xception (no weight download); random images.
Expected gradtel outcome: healthy, both optimizers step, no finding (`gradtel check` exit 0).
"""

import keras
import numpy as np
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {"check_exit": 0, "run_exit": 0, "optimizers": 2, "stepping": 2}

base_inputs = keras.Input(shape=(16, 16, 3))
x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(base_inputs)
x = layers.BatchNormalization()(x)
x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
base_model = keras.Model(base_inputs, x, name="small_xception")
base_model.trainable = False

inputs = keras.Input(shape=(16, 16, 3))
x = layers.Rescaling(scale=1 / 127.5, offset=-1)(inputs)
x = base_model(x, training=False)
x = layers.GlobalAveragePooling2D()(x)
x = layers.Dropout(0.2)(x)
outputs = layers.Dense(1)(x)
model = keras.Model(inputs, outputs)

rng = np.random.default_rng(0)
images = (rng.random((32, 16, 16, 3)) * 255).astype("float32")
labels = rng.integers(0, 2, (32, 1)).astype("float32")
model.compile(
    optimizer=keras.optimizers.Adam(),
    loss=keras.losses.BinaryCrossentropy(from_logits=True),
    metrics=[keras.metrics.BinaryAccuracy()],
)
model.fit(images, labels, batch_size=8, epochs=1, verbose=0)

base_model.trainable = True
model.compile(
    optimizer=keras.optimizers.Adam(1e-5),
    loss=keras.losses.BinaryCrossentropy(from_logits=True),
    metrics=[keras.metrics.BinaryAccuracy()],
)
model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
