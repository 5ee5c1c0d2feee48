"""GAN custom loop whose generator loss is computed on the discriminator's output for REAL images (tf.function).

The Keras guide's GAN loop (https://keras.io/guides/writing_a_custom_training_loop_in_tensorflow/, "End-to-end
example: a GAN training loop from scratch"), a @tf.function train_step, as in the guide, with a bug behind
many "ValueError: No gradients provided for any variable" reports (the error of tensorflow/tensorflow#41343 and
tensorflow/tensorflow#43258): the generator's loss is built from
discriminator(real_images) instead of discriminator(generated images). The generator is called inside its tape,
but nothing it computes reaches its loss, so every generator gradient is None and Keras raises in
g_optimizer.apply_gradients while tracing the step.
Expected gradtel outcome: `gradtel check` exit 1; every generator variable missing with cause `not_on_loss_path`
at the line that calls the generator in the generator's tape (marked CULPRIT); the script itself dies of Keras's
ValueError (exit 1), the generator's optimizer marked `raised`.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

# The discriminator step runs before the generator step raises (in the same trace: it never runs).
EXPECT = {
    "check_exit": 1,
    "run_exit": 1,
    "optimizers": 2,
    "stepping": 0,
    "raising": 1,
    "missing": {
        "generator/dense_1/kernel": "not_on_loss_path",
        "generator/conv2d_transpose/kernel": "not_on_loss_path",
        "generator/conv2d_1/bias": "not_on_loss_path",
    },
}

discriminator = keras.Sequential(
    [
        keras.Input(shape=(8, 8, 1)),
        layers.Conv2D(4, (3, 3), strides=(2, 2), padding="same"),
        layers.LeakyReLU(negative_slope=0.2),
        layers.GlobalMaxPooling2D(),
        layers.Dense(1),
    ],
    name="discriminator",
)
latent_dim = 8
generator = keras.Sequential(
    [
        keras.Input(shape=(latent_dim,)),
        layers.Dense(4 * 4 * 4),
        layers.LeakyReLU(negative_slope=0.2),
        layers.Reshape((4, 4, 4)),
        layers.Conv2DTranspose(4, (4, 4), strides=(2, 2), padding="same"),
        layers.LeakyReLU(negative_slope=0.2),
        layers.Conv2D(1, (3, 3), padding="same", activation="sigmoid"),
    ],
    name="generator",
)
d_optimizer = keras.optimizers.Adam(learning_rate=0.0003)
g_optimizer = keras.optimizers.Adam(learning_rate=0.0004)
loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)


@tf.function
def train_step(real_images):
    random_latent_vectors = tf.random.normal(shape=(tf.shape(real_images)[0], latent_dim))
    generated_images = generator(random_latent_vectors)
    combined_images = tf.concat([generated_images, real_images], axis=0)
    labels = tf.concat([tf.ones((tf.shape(real_images)[0], 1)), tf.zeros((tf.shape(real_images)[0], 1))], axis=0)
    labels += 0.05 * tf.random.uniform(labels.shape)

    with tf.GradientTape() as tape:
        predictions = discriminator(combined_images)
        d_loss = loss_fn(labels, predictions)
    grads = tape.gradient(d_loss, discriminator.trainable_weights)
    d_optimizer.apply_gradients(zip(grads, discriminator.trainable_weights))

    random_latent_vectors = tf.random.normal(shape=(tf.shape(real_images)[0], latent_dim))
    misleading_labels = tf.zeros((tf.shape(real_images)[0], 1))
    with tf.GradientTape() as tape:
        generated = generator(random_latent_vectors)  # CULPRIT
        predictions = discriminator(real_images)
        g_loss = loss_fn(misleading_labels, predictions)
    grads = tape.gradient(g_loss, generator.trainable_weights)
    g_optimizer.apply_gradients(zip(grads, generator.trainable_weights))
    return d_loss, g_loss, generated_images


dataset = tf.data.Dataset.from_tensor_slices(np.random.rand(24, 8, 8, 1).astype("float32")).batch(8)
for epoch in range(1):
    for step, real_images in enumerate(dataset):
        d_loss, g_loss, generated_images = train_step(real_images)
