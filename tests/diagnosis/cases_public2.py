"""Reproductions of publicly reported missing-gradient bugs (part 2): unused heads, multi-input/multi-output
models, losses that leave TensorFlow, preprocessing and embedding casts, keras.ops and Lambda layers with
non-differentiable ops, indices from a model output, and layers called once in __init__/build().
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
import tf_keras

from tests.diagnosis.cases_ops import batch, mlp
from tests.diagnosis.cases_public import NONDIFF, OUTSIDE, pair
from tests.diagnosis.corpus import Expectation, Step, case

ALL_MLP = ("hidden/kernel", "hidden/bias", "head/kernel", "head/bias")


@case(
    source="subclassed model computing an auxiliary head in call() but returning only the main output "
    "(tensorflow/tensorflow#22775: only one of a model's outputs used -> None; keras-team/keras#12521)",
    both=Expectation(pair("aux_logits", "not_on_loss_path")),
)
def aux_head_not_returned() -> Step:
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.trunk = keras.layers.Dense(4, activation="tanh", name="aux_trunk")
            self.main = keras.layers.Dense(1, name="main_out")
            self.aux = keras.layers.Dense(2, name="aux_logits")

        def call(self, inputs):
            features = self.trunk(inputs)
            main, _aux = self.main(features), self.aux(features)  # CULPRIT
            return main

    model, (x, y) = Net(), batch()
    model(x)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="two-input functional model whose second branch is gated by a Lambda threshold "
    "(tensorflow/tensorflow#44125 'No gradients provided for any variable when doing binarization')",
    both=Expectation(pair("gate_branch", NONDIFF), op="Greater"),
)
def multi_input_lambda_gate() -> Step:
    main_in, gate_in = keras.Input((3,), name="main_in"), keras.Input((3,), name="gate_in")
    gate_logits = keras.layers.Dense(3, name="gate_branch")(gate_in)
    gate = keras.layers.Lambda(lambda t: tf.cast(t > 0.0, "float32"))(gate_logits)  # CULPRIT
    main = keras.layers.Dense(3, name="main_branch")(main_in)
    model = keras.Model([main_in, gate_in], keras.layers.Dense(1, name="mi_head")(main * gate))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model([x, x * 2.0])[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="detector with class and box outputs, box loss on keras.ops.round(box * image_size) pixel coordinates "
    "(keras-team/keras#5107 'Can I use clip and round in lambda layer')",
    both=Expectation(pair("mo_box", NONDIFF), op="Round"),
)
def multi_output_rounded_box() -> Step:
    inputs = keras.Input((3,))
    trunk = keras.layers.Dense(4, activation="tanh", name="mo_trunk")(inputs)
    model = keras.Model(
        inputs, [keras.layers.Dense(2, name="mo_cls")(trunk), keras.layers.Dense(2, name="mo_box")(trunk)]
    )
    x, y = batch()
    labels, boxes = tf.cast(y, tf.int32), tf.fill((4, 2), 3.0)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step():
        with tf.GradientTape() as tape:
            cls_logits, box = model(x)
            pixel_box = keras.ops.round(box * 10.0)  # CULPRIT
            loss = ce(labels, cls_logits) + tf.reduce_mean(tf.square(pixel_box - boxes))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#30190 'tf.GradientTape().gradient() returns None': per-sample losses collected "
    "with float(loss) and the total rebuilt with tf.convert_to_tensor",
    eager=Expectation(dict.fromkeys(ALL_MLP, "left_tensorflow")),
)
def loss_from_python_floats() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)
            losses = [float(tf.square(pred[i, 0] - y[i])) for i in range(4)]  # CULPRIT
            loss = tf.convert_to_tensor(sum(losses) / 4.0)
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#30234 (alextp: values written into a tf.Variable are not differentiated): "
    "the loss wrapped in tf.Variable(...) inside the tape",
    eager=Expectation(dict.fromkeys(ALL_MLP, "stateful_assign")),
)
def loss_wrapped_in_variable() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)
            loss = tf.Variable(tf.reduce_mean(tf.square(pred[:, 0] - y)))  # CULPRIT
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="keras.layers.Discretization used inside a model on a learned score (preprocessing layer that "
    "outputs integer bucket ids; cf. kevinzakka/spatial-transformer-network#19: integer indices are constants)",
    both=Expectation(pair("score", NONDIFF)),
)
def discretization_inside_model() -> Step:
    class Bucketed(keras.Model):
        def __init__(self):
            super().__init__()
            self.score = keras.layers.Dense(1, name="score")
            self.buckets = keras.layers.Discretization(bin_boundaries=[-0.5, 0.0, 0.5])
            self.embed = keras.layers.Embedding(4, 2, name="bucket_embed")
            self.out = keras.layers.Dense(1, name="bucket_out")

        def call(self, inputs):
            ids = self.buckets(self.score(inputs))  # CULPRIT
            return self.out(self.embed(ids)[:, 0, :])

    model, (x, y) = Bucketed(), batch()
    model(x)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="embedding ids computed from a dense layer's output with tf.cast(..., tf.int32) "
    "(tensorflow/tensorflow#9260 comment: 'Integer-valued tensors don't have a gradient')",
    both=Expectation(pair("id_proj", NONDIFF), op="Cast"),
)
def embedding_ids_from_cast() -> Step:
    proj = keras.layers.Dense(1, name="id_proj")
    embed = keras.layers.Embedding(10, 2, name="id_embed")
    proj.build((None, 3))
    embed.build((None,))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            ids = tf.minimum(tf.cast(tf.abs(proj(x)[:, 0]) * 3.0, tf.int32), 9)  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.reduce_sum(embed(ids), axis=1) - y))
        variables = proj.trainable_variables + embed.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="vector-quantiser codebook lookup with keras.ops.argmax and no straight-through estimator "
    "(keras-team/keras#11157 'backend argmax has None for gradients')",
    both=Expectation(pair("vq_encoder", NONDIFF), op="ArgMax"),
)
def keras_ops_argmax_codebook() -> Step:
    encoder = keras.layers.Dense(4, name="vq_encoder")
    codebook = keras.layers.Embedding(4, 3, name="vq_codebook")
    encoder.build((None, 3))
    codebook.build((None,))
    x, _ = batch()

    def step():
        with tf.GradientTape() as tape:
            code = keras.ops.argmax(encoder(x), axis=-1)  # CULPRIT
            loss = keras.ops.mean(keras.ops.square(codebook(code) - x))
        variables = encoder.trainable_variables + codebook.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="Keras 3 dice loss on keras.ops.one_hot(keras.ops.argmax(pred)) (keras-team/keras#9169 "
    "'Lambda layer: None values not supported' with one_hot(argmax))",
    both=Expectation(dict.fromkeys(ALL_MLP, NONDIFF), op="ArgMax"),
)
def keras_ops_one_hot_argmax_dice() -> Step:
    model, (x, y) = mlp(), batch()
    target = keras.ops.one_hot(keras.ops.cast(y, "int32"), 2)

    def step():
        with tf.GradientTape() as tape:
            hard = keras.ops.one_hot(keras.ops.argmax(model(x), axis=-1), 2)  # CULPRIT
            loss = 1.0 - 2.0 * keras.ops.sum(hard * target) / keras.ops.sum(hard + target)
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="keras-team/keras#11157 and tensorflow/tensorflow#52260: Lambda(argmax) between two Dense layers of a "
    "Sequential model",
    both=Expectation(pair("lam_in", NONDIFF), op="ArgMax"),
)
def lambda_argmax_sequential() -> Step:
    def predicted_class(t):
        return keras.ops.cast(keras.ops.argmax(t, axis=-1)[:, None], "float32")  # CULPRIT

    layers = [keras.Input((3,)), keras.layers.Dense(4, name="lam_in"), keras.layers.Lambda(predicted_class)]
    model = keras.Sequential([*layers, keras.layers.Dense(1, name="lam_out")])
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#44125: Lambda binarizer x * cast(random_uniform(shape) <= p) after a sigmoid Dense",
    both=Expectation(pair("bern_prob", NONDIFF), op="LessEqual"),
)
def lambda_stochastic_binarize() -> Step:
    inputs = keras.Input((3,))
    prob = keras.layers.Dense(1, activation="sigmoid", name="bern_prob")(inputs)

    def binarize(t):
        return t[0] * tf.cast(tf.random.uniform(tf.shape(t[1])) <= t[1], "float32")  # CULPRIT

    sampled = keras.layers.Lambda(binarize)([inputs, prob])
    model = keras.Model(inputs, keras.layers.Dense(1, name="bern_out")(sampled))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="kevinzakka/spatial-transformer-network#19 (tf.gradients(tf.gather(data, index), index) is None): tf.gather "
    "with indices computed from a localisation network's output",
    both=Expectation(pair("locator", NONDIFF), op="Cast"),
)
def gather_index_from_model() -> Step:
    locator = keras.layers.Dense(1, name="locator")
    locator.build((None, 3))
    x, y = batch()
    row = tf.linspace(0.0, 1.0, 10)

    def step():
        with tf.GradientTape() as tape:
            position = tf.cast(tf.sigmoid(locator(x)[:, 0]) * 9.0, tf.int32)  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.gather(row, position) - y))
        return tape.gradient(loss, locator.trainable_variables), locator.trainable_variables

    return step


@case(
    source="prototypical network whose class prototypes are computed once in the model's __init__ "
    "(cf. tensorflow/tensorflow#40632: tensors derived from weights once, outside call(), get no gradient)",
    both=Expectation(pair("proto_proj", OUTSIDE)),
)
def prototypes_computed_in_init() -> Step:
    class ProtoNet(keras.Model):
        def __init__(self, support):
            super().__init__()
            self.embed = keras.layers.Dense(4, name="proto_embed")
            self.proj = keras.layers.Dense(4, name="proto_proj")
            self.prototypes = self.proj(support)  # CULPRIT

        def call(self, queries):
            return -tf.reduce_sum(tf.square(self.embed(queries)[:, None, :] - self.prototypes[None]), axis=-1)

    x, y = batch()
    model = ProtoNet(x[:2])
    model(x)
    labels = tf.cast(y, tf.int32)

    def step():
        with tf.GradientTape() as tape:
            logits = model(x)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="hypernetwork layer that generates its kernel once in build() from a sub-layer "
    "(tensorflow/tensorflow#40632: weights concatenated once in build() -> 'No gradients provided')",
    both=Expectation(pair("hyper_gen", OUTSIDE)),
)
def hypernetwork_kernel_in_build() -> Step:
    class HyperDense(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hyper = keras.layers.Dense(3, name="hyper_gen")
            self.z = tf.ones((1, 2))

        def build(self, input_shape):
            self.generated = tf.reshape(self.hyper(self.z), (3, 1))  # CULPRIT

        def call(self, inputs):
            return tf.matmul(inputs, self.generated)

    layer, (x, y) = HyperDense(name="hyper_dense"), batch()
    layer(x)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x)[:, 0] - y))
        return tape.gradient(loss, layer.trainable_variables), layer.trainable_variables

    return step


@case(
    source="jax-ml/jax#17556 (loss on jax.random.categorical samples has no gradient) and tensorflow/tensorflow#9260 "
    "(integer samples have no gradient; use REINFORCE, cf. shehzaadzd/MINERVA#4): loss on tf.random.categorical ids",
    both=Expectation(pair("policy", NONDIFF), op="Multinomial"),
)
def reinforce_loss_on_sampled_actions() -> Step:
    policy = keras.layers.Dense(2, name="policy")
    policy.build((None, 3))
    states, rewards = batch()

    def step():
        with tf.GradientTape() as tape:
            actions = tf.random.categorical(policy(states), 1)[:, 0]  # CULPRIT
            loss = -tf.reduce_mean(rewards * tf.cast(actions, tf.float32))
        return tape.gradient(loss, policy.trainable_variables), policy.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#30190: histogram-matching loss; here with tf.histogram_fixed_width of the "
    "predictions (integer counts)",
    both=Expectation(dict.fromkeys(ALL_MLP, NONDIFF), op="HistogramFixedWidth"),
)
def histogram_loss() -> Step:
    model, (x, _) = mlp(), batch()
    target_hist = tf.constant([0.25, 0.25, 0.25, 0.25])

    def step():
        with tf.GradientTape() as tape:
            counts = tf.histogram_fixed_width(model(x)[:, 0], [-2.0, 2.0], nbins=4)  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.cast(counts, tf.float32) / 4.0 - target_hist))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#36596 (predictions converted to NumPy inside the tape) and #38751; Keras 3 variant "
    "with keras.ops.convert_to_numpy on the predictions",
    eager=Expectation(dict.fromkeys(ALL_MLP, "left_tensorflow")),
)
def convert_to_numpy_inside_tape() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            pred = keras.ops.convert_to_numpy(model(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.constant(np.asarray(pred)[:, 0]) - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tf.keras (Keras 2) Lambda(lambda t: K.round(t)) quantiser between Dense layers (keras-team/keras#5107, "
    "'Common ops without gradient: K.argmax, K.round, K.eval')",
    both=Expectation(pair("k2_in", NONDIFF), op="Round"),
)
def tf_keras_lambda_round() -> Step:
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Dense(3, input_shape=(3,), name="k2_in"),
            tf_keras.layers.Lambda(lambda t: tf_keras.backend.round(t * 4.0) / 4.0),  # CULPRIT
            tf_keras.layers.Dense(1, name="k2_out"),
        ]
    )
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="keras.ops.where(prob > 0.5, 1, 0) with integer branches as the hard mask of an IoU loss "
    "(tensorflow/tensorflow#44125-style thresholding)",
    both=Expectation(pair("seg_logits", NONDIFF), op="Greater"),
)
def keras_ops_where_integer_branches() -> Step:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="seg_logits")])
    x, _ = batch()
    target = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])

    def step():
        with tf.GradientTape() as tape:
            mask = keras.ops.where(keras.ops.sigmoid(model(x)) > 0.5, 1, 0)  # CULPRIT
            hard = keras.ops.cast(mask, "float32")
            loss = 1.0 - keras.ops.sum(hard * target) / (keras.ops.sum(hard + target) + 1.0)
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="DDPG/TD3 soft (Polyak) target update written inside the training tape, the loss then computed through "
    "the target network (tensorflow/tensorflow#30234, #54532: assignments are not differentiated)",
    both=Expectation({"polyak_online/kernel": "stateful_assign"}),
)
def polyak_update_inside_tape() -> Step:
    online = keras.layers.Dense(1, use_bias=False, name="polyak_online")
    target_layer = keras.layers.Dense(1, use_bias=False, name="polyak_target")
    online.build((None, 3))
    target_layer.build((None, 3))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            target_layer.kernel.assign(0.995 * target_layer.kernel + 0.005 * online.kernel)  # CULPRIT
            loss = tf.reduce_mean(tf.square(target_layer(x)[:, 0] - y))
        return tape.gradient(loss, online.trainable_variables), online.trainable_variables

    return step


@case(
    source="keras-team/keras#16663 (rank loss tf.argsort(tf.argsort(y_pred)): 'No gradients provided for any "
    "variable')",
    both=Expectation(pair("ranker", NONDIFF), op="TopKV2"),
)
def rank_loss_from_argsort() -> Step:
    ranker = keras.layers.Dense(1, name="ranker")
    ranker.build((None, 3))
    x, _ = batch()
    true_ranks = tf.constant([3.0, 2.0, 1.0, 0.0])

    def step():
        with tf.GradientTape() as tape:
            ranks = tf.argsort(tf.argsort(ranker(x)[:, 0]))  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.cast(ranks, tf.float32) - true_ranks))
        return tape.gradient(loss, ranker.trainable_variables), ranker.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#21985 'While loop no gradients provided for any variable' and #5888 (Round has no "
    "gradient): an iterative refinement tf.while_loop whose body rounds the state; inside tf.function the While "
    "gradient turns the body's None into zeros, so graph mode sees an all-zero gradient instead of None",
    eager=Expectation(pair("refine", NONDIFF), op="Round"),
    graph=Expectation({}, zero_hints=pair("refine", "zero_gradient_op")),
)
def round_inside_while_loop() -> Step:
    refine = keras.layers.Dense(3, name="refine")
    readout = keras.layers.Dense(1, name="refine_readout")
    refine.build((None, 3))
    readout.build((None, 3))
    x, y = batch()

    def body(i, state):
        return i + 1, tf.round(refine(state) * 4.0) / 4.0  # CULPRIT

    def step():
        with tf.GradientTape() as tape:
            _, state = tf.while_loop(lambda i, _: i < 2, body, [tf.constant(0), x])
            loss = tf.reduce_mean(tf.square(readout(state)[:, 0] - y))
        variables = refine.trainable_variables + readout.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tensorflow/tensorflow#5888 'No gradient defined for operation Round': the rounding sits in a "
    "@tf.function-decorated helper called from the training step",
    both=Expectation(pair("helper_in", NONDIFF), op="Round"),
)
def round_in_tf_function_helper() -> Step:
    @tf.function
    def quantize(values):
        return tf.round(values * 8.0) / 8.0  # CULPRIT

    first = keras.layers.Dense(3, name="helper_in")
    second = keras.layers.Dense(1, name="helper_out")
    first.build((None, 3))
    second.build((None, 3))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(second(quantize(first(x)))[:, 0] - y))
        variables = first.trainable_variables + second.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tensorflow/tensorflow#52260 (tf.keras 2.x, argmax of the generator output): tf.keras model with "
    "tf.argmax in the custom-loop loss",
    both=Expectation(pair("k2_argmax", NONDIFF), op="ArgMax"),
)
def tf_keras_argmax_loss() -> Step:
    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,), name="k2_argmax")])
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            pred = tf.cast(tf.argmax(model(x), axis=-1), tf.float32)  # CULPRIT
            loss = tf.reduce_mean(tf.square(pred - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#31265 'No gradients provided for any variable' (answer: the prediction must be "
    "computed inside the tape): tf.keras model called before the GradientTape",
    both=Expectation({**pair("k2_hidden", OUTSIDE), **pair("k2_head", OUTSIDE)}),
)
def tf_keras_forward_before_tape() -> Step:
    model = tf_keras.Sequential(
        [tf_keras.layers.Dense(4, input_shape=(3,), name="k2_hidden"), tf_keras.layers.Dense(1, name="k2_head")]
    )
    x, y = batch()

    def step():
        pred = model(x)  # CULPRIT
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(pred[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="fake-quantisation toggled with tf.cond(training, lambda: tf.round(h), lambda: h) (tensorflow/tensorflow"
    "#5888, Round has no gradient); inside tf.function the If gradient turns the taken branch's None into zeros",
    eager=Expectation(pair("qat_in", NONDIFF), op="Round"),
    graph=Expectation({}, zero_hints=pair("qat_in", "zero_gradient_op")),
)
def round_inside_cond_branch() -> Step:
    first = keras.layers.Dense(3, name="qat_in")
    second = keras.layers.Dense(1, name="qat_out")
    first.build((None, 3))
    second.build((None, 3))
    x, y = batch()
    quantize = tf.constant(True)

    def step():
        with tf.GradientTape() as tape:
            hidden = first(x)
            hidden = tf.cond(quantize, lambda: tf.round(hidden * 4.0) / 4.0, lambda: hidden)  # CULPRIT
            loss = tf.reduce_mean(tf.square(second(hidden)[:, 0] - y))
        variables = first.trainable_variables + second.trainable_variables
        return tape.gradient(loss, variables), variables

    return step
