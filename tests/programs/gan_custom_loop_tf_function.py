"""DCGAN custom training loop whose train_step is a tf.function, with two optimizers.

Adapted from the TensorFlow tutorial "Deep Convolutional Generative Adversarial Network"
(https://www.tensorflow.org/tutorials/generative/dcgan), the loop the Keras guide's GAN example also uses
(https://keras.io/guides/writing_a_custom_training_loop_in_tensorflow/): a @tf.function train_step with a
gen_tape and a disc_tape, generator_loss on fake_output, discriminator_loss on real and fake output, and two Adam
optimizers. Random images instead of MNIST, tiny models.
Expected gradtel outcome: healthy, both optimizers step, no finding (`gradtel check` exit 0).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {"check_exit": 0, "run_exit": 0, "optimizers": 2, "stepping": 2}

BATCH_SIZE = 8
noise_dim = 8


def make_generator_model():
    return keras.Sequential(
        [
            keras.Input(shape=(noise_dim,)),
            layers.Dense(4 * 4 * 8, use_bias=False),
            layers.BatchNormalization(),
            layers.LeakyReLU(),
            layers.Reshape((4, 4, 8)),
            layers.Conv2DTranspose(1, (5, 5), strides=(2, 2), padding="same", use_bias=False, activation="tanh"),
        ]
    )


def make_discriminator_model():
    return keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),
            layers.Conv2D(4, (5, 5), strides=(2, 2), padding="same"),
            layers.LeakyReLU(),
            layers.Dropout(0.3),
            layers.Flatten(),
            layers.Dense(1),
        ]
    )


generator = make_generator_model()
discriminator = make_discriminator_model()
cross_entropy = keras.losses.BinaryCrossentropy(from_logits=True)


def discriminator_loss(real_output, fake_output):
    real_loss = cross_entropy(tf.ones_like(real_output), real_output)
    fake_loss = cross_entropy(tf.zeros_like(fake_output), fake_output)
    return real_loss + fake_loss


def generator_loss(fake_output):
    return cross_entropy(tf.ones_like(fake_output), fake_output)


generator_optimizer = keras.optimizers.Adam(1e-4)
discriminator_optimizer = keras.optimizers.Adam(1e-4)


@tf.function
def train_step(images):
    noise = tf.random.normal([BATCH_SIZE, noise_dim])
    with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
        generated_images = generator(noise, training=True)
        real_output = discriminator(images, training=True)
        fake_output = discriminator(generated_images, training=True)
        gen_loss = generator_loss(fake_output)
        disc_loss = discriminator_loss(real_output, fake_output)
    gradients_of_generator = gen_tape.gradient(gen_loss, generator.trainable_variables)
    gradients_of_discriminator = disc_tape.gradient(disc_loss, discriminator.trainable_variables)
    generator_optimizer.apply_gradients(zip(gradients_of_generator, generator.trainable_variables))
    discriminator_optimizer.apply_gradients(zip(gradients_of_discriminator, discriminator.trainable_variables))


train_images = np.random.uniform(-1, 1, (24, 8, 8, 1)).astype("float32")
train_dataset = tf.data.Dataset.from_tensor_slices(train_images).batch(BATCH_SIZE)
for epoch in range(1):
    for image_batch in train_dataset:
        train_step(image_batch)
