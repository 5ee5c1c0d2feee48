"""WGAN-GP: a Model subclass whose train_step takes several critic steps (with a nested-tape gradient penalty) per
generator step, two optimizers, trained with fit.

Adapted from keras-io "WGAN-GP overriding Model.train_step" (https://keras.io/examples/generative/wgan_gp/): same
WGAN(keras.Model) with compile(d_optimizer, g_optimizer, d_loss_fn, g_loss_fn), gradient_penalty computed with an
inner GradientTape on interpolated images, discriminator_extra_steps critic updates then one generator update,
Adam(beta_1=0.5, beta_2=0.9) for both, discriminator_loss/generator_loss as in the example, fit on arrays.
Tiny models and random images instead of Fashion-MNIST.
Expected gradtel outcome: both optimizers step and train, but the critic's output bias (dense/bias) gets an
all-zero gradient at every step, which is true of WGAN, not a gradtel error: the Wasserstein loss
mean(critic(fake)) - mean(critic(real)) cancels the bias, and the gradient penalty does not depend on it (checked in
plain TF: max |grad| is exactly 0.0). No op on the path explains it, so the cause is `other` with no location, and
`gradtel check` exits 1. The script runs to the end (exit 0).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

# Keras 3 compile() without an optimizer creates a default RMSprop that never steps, as in the original.
EXPECT = {"check_exit": 1, "run_exit": 0, "optimizers": 3, "stepping": 2, "zero": {"dense/bias": "other"}}

IMG_SHAPE = (8, 8, 1)
noise_dim = 8


def get_discriminator_model():
    img_input = layers.Input(shape=IMG_SHAPE)
    x = layers.Conv2D(4, (3, 3), strides=(2, 2), padding="same")(img_input)
    x = layers.LeakyReLU(0.2)(x)
    x = layers.Conv2D(8, (3, 3), strides=(2, 2), padding="same")(x)
    x = layers.LeakyReLU(0.2)(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1)(x)
    return keras.models.Model(img_input, x, name="discriminator")


def get_generator_model():
    noise = layers.Input(shape=(noise_dim,))
    x = layers.Dense(4 * 4 * 8, use_bias=False)(noise)
    x = layers.BatchNormalization()(x)
    x = layers.LeakyReLU(0.2)(x)
    x = layers.Reshape((4, 4, 8))(x)
    x = layers.UpSampling2D((2, 2))(x)
    x = layers.Conv2D(1, (3, 3), padding="same", use_bias=False)(x)
    x = layers.Activation("tanh")(x)
    return keras.models.Model(noise, x, name="generator")


class WGAN(keras.Model):
    def __init__(self, discriminator, generator, latent_dim, discriminator_extra_steps=3, gp_weight=10.0):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.d_steps = discriminator_extra_steps
        self.gp_weight = gp_weight

    def compile(self, d_optimizer, g_optimizer, d_loss_fn, g_loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.d_loss_fn = d_loss_fn
        self.g_loss_fn = g_loss_fn

    def gradient_penalty(self, batch_size, real_images, fake_images):
        alpha = tf.random.uniform([batch_size, 1, 1, 1], 0.0, 1.0)
        diff = fake_images - real_images
        interpolated = real_images + alpha * diff
        with tf.GradientTape() as gp_tape:
            gp_tape.watch(interpolated)
            pred = self.discriminator(interpolated, training=True)
        grads = gp_tape.gradient(pred, [interpolated])[0]
        norm = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3]))
        return tf.reduce_mean((norm - 1.0) ** 2)

    def train_step(self, real_images):
        if isinstance(real_images, tuple):
            real_images = real_images[0]
        batch_size = tf.shape(real_images)[0]
        for i in range(self.d_steps):
            random_latent_vectors = tf.random.normal(shape=(batch_size, self.latent_dim))
            with tf.GradientTape() as tape:
                fake_images = self.generator(random_latent_vectors, training=True)
                fake_logits = self.discriminator(fake_images, training=True)
                real_logits = self.discriminator(real_images, training=True)
                d_cost = self.d_loss_fn(real_img=real_logits, fake_img=fake_logits)
                gp = self.gradient_penalty(batch_size, real_images, fake_images)
                d_loss = d_cost + gp * self.gp_weight
            d_gradient = tape.gradient(d_loss, self.discriminator.trainable_variables)
            self.d_optimizer.apply_gradients(zip(d_gradient, self.discriminator.trainable_variables))

        random_latent_vectors = tf.random.normal(shape=(batch_size, self.latent_dim))
        with tf.GradientTape() as tape:
            generated_images = self.generator(random_latent_vectors, training=True)
            gen_img_logits = self.discriminator(generated_images, training=True)
            g_loss = self.g_loss_fn(gen_img_logits)
        gen_gradient = tape.gradient(g_loss, self.generator.trainable_variables)
        self.g_optimizer.apply_gradients(zip(gen_gradient, self.generator.trainable_variables))
        return {"d_loss": d_loss, "g_loss": g_loss}


def discriminator_loss(real_img, fake_img):
    return tf.reduce_mean(fake_img) - tf.reduce_mean(real_img)


def generator_loss(fake_img):
    return -tf.reduce_mean(fake_img)


train_images = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype("float32")
wgan = WGAN(discriminator=get_discriminator_model(), generator=get_generator_model(), latent_dim=noise_dim)
wgan.compile(
    d_optimizer=keras.optimizers.Adam(learning_rate=0.0002, beta_1=0.5, beta_2=0.9),
    g_optimizer=keras.optimizers.Adam(learning_rate=0.0002, beta_1=0.5, beta_2=0.9),
    g_loss_fn=generator_loss,
    d_loss_fn=discriminator_loss,
)
wgan.fit(train_images, batch_size=8, epochs=1, verbose=0)
