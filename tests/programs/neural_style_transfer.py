"""Neural style transfer: an image tf.Variable optimized through a frozen CNN feature extractor.

Adapted from keras-io "Neural style transfer" (https://keras.io/examples/generative/neural_style_transfer/): same
feature_extractor (a keras.Model returning a dict of layer outputs), gram_matrix, style_loss, content_loss,
total_variation_loss, a @tf.function compute_loss_and_grads returning the gradient of the combination image only,
and SGD with an ExponentialDecay schedule. A tiny random-weight CNN replaces VGG19 (no weight download): its weights
stay trainable and are read inside the tape, but are never given to the optimizer, as in the original (intended).
Expected gradtel outcome: healthy, the optimizer steps, no finding (`gradtel check` exit 0); the extractor's
weights are only a note.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {"check_exit": 0, "run_exit": 0, "optimizers": 1, "stepping": 1}

img_nrows, img_ncols = 16, 16
total_variation_weight, style_weight, content_weight = 1e-6, 1e-6, 2.5e-8

inputs = keras.Input((img_nrows, img_ncols, 3))
x = layers.Conv2D(4, 3, padding="same", activation="relu", name="block1_conv1")(inputs)
x = layers.Conv2D(4, 3, padding="same", activation="relu", name="block2_conv1")(x)
x = layers.Conv2D(8, 3, padding="same", activation="relu", name="block5_conv2")(x)
model = keras.Model(inputs, x, name="small_vgg")
outputs_dict = {layer.name: layer.output for layer in model.layers}
feature_extractor = keras.Model(inputs=model.inputs, outputs=outputs_dict)
style_layer_names = ["block1_conv1", "block2_conv1"]
content_layer_name = "block5_conv2"


def gram_matrix(x):
    x = tf.transpose(x, (2, 0, 1))
    features = tf.reshape(x, (tf.shape(x)[0], -1))
    return tf.matmul(features, tf.transpose(features))


def style_loss(style, combination):
    S, C = gram_matrix(style), gram_matrix(combination)
    channels, size = 3, img_nrows * img_ncols
    return tf.reduce_sum(tf.square(S - C)) / (4.0 * (channels**2) * (size**2))


def content_loss(base, combination):
    return tf.reduce_sum(tf.square(combination - base))


def total_variation_loss(x):
    a = tf.square(x[:, : img_nrows - 1, : img_ncols - 1, :] - x[:, 1:, : img_ncols - 1, :])
    b = tf.square(x[:, : img_nrows - 1, : img_ncols - 1, :] - x[:, : img_nrows - 1, 1:, :])
    return tf.reduce_sum(tf.pow(a + b, 1.25))


def compute_loss(combination_image, base_image, style_reference_image):
    input_tensor = tf.concat([base_image, style_reference_image, combination_image], axis=0)
    features = feature_extractor(input_tensor)
    loss = tf.zeros(shape=())
    layer_features = features[content_layer_name]
    loss = loss + content_weight * content_loss(layer_features[0, :, :, :], layer_features[2, :, :, :])
    for layer_name in style_layer_names:
        layer_features = features[layer_name]
        sl = style_loss(layer_features[1, :, :, :], layer_features[2, :, :, :])
        loss += (style_weight / len(style_layer_names)) * sl
    loss += total_variation_weight * total_variation_loss(combination_image)
    return loss


@tf.function
def compute_loss_and_grads(combination_image, base_image, style_reference_image):
    with tf.GradientTape() as tape:
        loss = compute_loss(combination_image, base_image, style_reference_image)
    grads = tape.gradient(loss, combination_image)
    return loss, grads


optimizer = keras.optimizers.SGD(
    keras.optimizers.schedules.ExponentialDecay(initial_learning_rate=100.0, decay_steps=100, decay_rate=0.96)
)
rng = np.random.default_rng(0)
base_image = tf.constant(rng.random((1, img_nrows, img_ncols, 3)), "float32")
style_reference_image = tf.constant(rng.random((1, img_nrows, img_ncols, 3)), "float32")
combination_image = tf.Variable(base_image, name="combination_image")
for i in range(1, 4):
    loss, grads = compute_loss_and_grads(combination_image, base_image, style_reference_image)
    optimizer.apply_gradients([(grads, combination_image)])
