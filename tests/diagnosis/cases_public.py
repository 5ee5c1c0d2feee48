"""Reproductions of publicly reported missing-gradient bugs (part 1): shape-only losses, tf.data pipelines,
tf.custom_gradient, partial tapes, metrics used as losses, target networks, BatchNorm statistics, unused
projections.

Each ``source`` cites the public report the case reproduces (or the report whose mechanism it isolates).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tests.diagnosis.cases_ops import batch, mlp
from tests.diagnosis.corpus import Expectation, Step, case

NONDIFF = "non_differentiable_op"
OUTSIDE = "outside_tape"


def pair(layer: str, category: str) -> dict[str, str]:
    """Expect ``category`` for a Dense/Embedding-style layer's kernel and bias."""
    return {f"{layer}/kernel": category, f"{layer}/bias": category}


def sequence() -> tf.Tensor:
    """A tiny (batch=2, time=4, features=3) sequence batch."""
    return tf.reshape(tf.linspace(-1.0, 1.0, 24), (2, 4, 3))


@case(
    source="typo in the TF DCGAN tutorial's generator_loss (discussed in SO 61489802): "
    "cross_entropy(tf.ones_like(fake_output), tf.ones_like(fake_output)); no single public report of this typo found",
    both=Expectation(pair("gen_core", "loss_disconnected")),
)
def gan_loss_from_ones_like() -> Step:
    generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="gen_core")])
    discriminator = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="disc_core")])
    noise = tf.ones((4, 2))
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def step():
        with tf.GradientTape() as tape:
            fake_output = discriminator(generator(noise))
            gen_loss = bce(tf.ones_like(fake_output), tf.ones_like(fake_output))  # CULPRIT
        return tape.gradient(gen_loss, generator.trainable_variables), generator.trainable_variables

    return step


@case(
    source="SO 50784337 'Gradients of operations done in the tensorflow.data.Dataset.map function' "
    "(cited in tensorflow/tensorflow#38751): a model applied inside Dataset.map",
    both=Expectation(pair("map_encoder", OUTSIDE)),
)
def encoder_in_dataset_map() -> Step:
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="map_encoder")])
    head = keras.layers.Dense(1, name="map_head")
    head.build((None, 4))
    x, y = batch()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    data = data.map(lambda features, target: (encoder(features), target))  # CULPRIT

    def step():
        features, target = next(iter(data))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(head(features)[:, 0] - target))
        variables = encoder.trainable_variables + head.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tensorflow/tensorflow#30672 'Backpropagate through tf.data' and #19556 (SO 50155021, per-sample "
    "weights indexed in the Dataset pipeline get None): features (an embedding lookup) computed in the pipeline",
    both=Expectation({"pipe_embed/embeddings": OUTSIDE}),
)
def embedding_in_dataset_map() -> Step:
    embed = keras.layers.Embedding(10, 3, name="pipe_embed")
    embed.build((None,))
    head = keras.layers.Dense(1, name="pipe_head")
    head.build((None, 3))
    ids, y = tf.constant([1, 2, 3, 4]), tf.constant([0.0, 1.0, 1.0, 0.0])
    data = tf.data.Dataset.from_tensor_slices((ids, y)).batch(4)
    data = data.map(lambda token, target: (embed(token), target))  # CULPRIT

    def step():
        vectors, target = next(iter(data))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(head(vectors)[:, 0] - target))
        variables = embed.trainable_variables + head.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tensorflow/tensorflow#31945 and #21756: tf.custom_gradient over a function that reads a variable; "
    "grad_fn returns None for the variables",
    both=Expectation({"cg_scale": NONDIFF}, op="custom_gradient"),
)
def custom_gradient_variable_grad_none() -> Step:
    scale = tf.Variable(2.0, name="cg_scale")

    @tf.custom_gradient
    def scaled(values):
        def grad(upstream, variables=None):
            return upstream * scale, [None for _ in variables or []]

        return values * scale, grad

    model, (x, y) = mlp(), batch()
    hidden, head = model.layers

    def step():
        with tf.GradientTape() as tape:
            features = scaled(hidden(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(head(features)[:, 0] - y))
        variables = [scale]
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tensorflow/tensorflow#21756 'input and output of @tf.custom_gradient' and pumpikano/tf-dann#27 "
    "(grad returns (dy * l, None)): a two-input custom gradient whose second input comes from a gating layer",
    both=Expectation(pair("gate_net", NONDIFF), op="custom_gradient"),
)
def custom_gradient_second_input_none() -> Step:
    @tf.custom_gradient
    def gated(values, gate):
        def grad(upstream):
            return upstream * gate, None

        return values * gate, grad

    gate_net = keras.layers.Dense(3, activation="sigmoid", name="gate_net")
    value_net = keras.layers.Dense(3, name="value_net")
    gate_net.build((None, 3))
    value_net.build((None, 3))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            out = gated(value_net(x), gate_net(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(tf.reduce_sum(out, axis=1) - y))
        variables = gate_net.trainable_variables + value_net.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="gradient-clipping tf.custom_gradient (pattern of tensorflow/tensorflow#21756) whose grad_fn computes the "
    "clipped gradient but forgets the return statement; no single public report of this slip found",
    both=Expectation({"hidden/kernel": NONDIFF, "hidden/bias": NONDIFF}, op="custom_gradient"),
)
def custom_gradient_missing_return() -> Step:
    @tf.custom_gradient
    def clip_gradient(values):
        def grad(upstream):
            tf.clip_by_norm(upstream, 1.0)

        return tf.identity(values), grad

    model, (x, y) = mlp(), batch()
    hidden, head = model.layers

    def step():
        with tf.GradientTape() as tape:
            features = clip_gradient(hidden(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(head(features)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="keras.ops.custom_gradient as introduced in keras-team/keras#19302 (grad(*args, upstream=None)), used for "
    "a straight-through rounding whose grad returns None (keras-team/keras#5107: round has no gradient)",
    both=Expectation(pair("ste_in", NONDIFF), op="custom_gradient"),
)
def keras_custom_gradient_none() -> Step:
    @keras.ops.custom_gradient
    def straight_through_round(values):
        def grad(*args, upstream=None):
            return None

        return keras.ops.round(values), grad

    first = keras.layers.Dense(3, name="ste_in")
    second = keras.layers.Dense(1, name="ste_out")
    first.build((None, 3))
    second.build((None, 3))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            codes = straight_through_round(first(x))  # CULPRIT
            loss = tf.reduce_mean(tf.square(second(codes)[:, 0] - y))
        variables = first.trainable_variables + second.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="keras-team/keras#19155 'tf.GradientTape.watch in Keras 3': tape(watch_accessed_variables=False) "
    "watching only the output layer of a subclassed model",
    both=Expectation(pair("wb_body", OUTSIDE)),
)
def watch_only_output_layer() -> Step:
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.body = keras.layers.Dense(4, activation="tanh", name="wb_body")
            self.out_layer = keras.layers.Dense(1, name="wb_out")

        def call(self, inputs):
            return self.out_layer(self.body(inputs))

    model, (x, y) = Net(), batch()
    model(x)

    def step():
        with tf.GradientTape(watch_accessed_variables=False) as tape:  # CULPRIT
            tape.watch([v.value for v in model.out_layer.trainable_variables])
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#29942: the tape watches a tensor computed from the variable before the tape "
    "(a copy), and the gradient is asked for the variable",
    both=Expectation({"copied_w": OUTSIDE}),
)
def watch_tensor_copy() -> Step:
    w = tf.Variable(tf.ones((3, 1)), name="copied_w")
    x, y = batch()

    def step():
        w_value = tf.identity(w)  # CULPRIT
        with tf.GradientTape() as tape:
            tape.watch(w_value)
            loss = tf.reduce_mean(tf.square(tf.matmul(x, w_value)[:, 0] - y))
        return tape.gradient(loss, [w]), [w]

    return step


@case(
    source="tensorflow/tensorflow#27660 'gradient not computed unless variable is assigned': the loss is computed "
    "after the `with GradientTape()` block has closed",
    both=Expectation({"hidden/kernel": OUTSIDE, "hidden/bias": OUTSIDE, "head/kernel": OUTSIDE, "head/bias": OUTSIDE}),
)
def loss_after_tape_block() -> Step:
    model, (x, y) = mlp(), batch()

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)
        loss = tf.reduce_mean(tf.square(pred[:, 0] - y))  # CULPRIT
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="keras-team/keras#19150 (keras.metrics.SparseCategoricalCrossentropy used as the loss: 'No gradients "
    "provided for any variable'); here keras.metrics.MeanSquaredError()",
    both=Expectation(
        {
            "hidden/kernel": "stateful_assign",
            "hidden/bias": "stateful_assign",
            "head/kernel": "stateful_assign",
            "head/bias": "stateful_assign",
        }
    ),
)
def metric_object_as_loss() -> Step:
    model, (x, y) = mlp(), batch()
    mse_metric = keras.metrics.MeanSquaredError()

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)[:, :1]
            loss = mse_metric(y[:, None], pred)  # CULPRIT
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="keras-team/keras#19150 (a keras.metrics object used as the loss): a functional model trained on "
    "keras.metrics.BinaryCrossentropy's result",
    both=Expectation({**pair("bce_hidden", "stateful_assign"), **pair("bce_out", "stateful_assign")}),
)
def metric_bce_as_loss() -> Step:
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="relu", name="bce_hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="bce_out")(hidden))
    x, y = batch()
    bce_metric = keras.metrics.BinaryCrossentropy(from_logits=True)

    def step():
        with tf.GradientTape() as tape:
            logits = model(x)
            loss = bce_metric(y[:, None], logits)  # CULPRIT
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="openai/baselines#105 (tf.stop_gradient on the DQN target Q) and MorvanZhou/Reinforcement-learning-with-"
    "tensorflow#109 (other network's variables in the var_list): target model's variables passed to the optimizer",
    both=Expectation(pair("q_target", "stop_gradient"), op="StopGradient"),
)
def dqn_target_variables_passed() -> Step:
    online = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="q_online")], name="online")
    target_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="q_target")], name="target")
    states, rewards = batch()
    next_states, actions = states * 0.5, tf.constant([0, 1, 1, 0])

    def step():
        with tf.GradientTape() as tape:
            next_q = tf.stop_gradient(target_model(next_states))  # CULPRIT
            targets = rewards + 0.9 * tf.reduce_max(next_q, axis=1)
            q_taken = tf.gather(online(states), actions, batch_dims=1)
            loss = tf.reduce_mean(tf.square(targets - q_taken))
        variables = online.trainable_variables + target_model.trainable_variables
        return tape.gradient(loss, variables), variables

    return step


@case(
    source="tensorflow/tensorflow#43065 (DDPG update: 'No gradients provided for any variable'): the critic loss's "
    "gradient taken w.r.t. the actor's variables; only the target actor is called",
    both=Expectation(pair("actor_dense", "unused"), located=False),
)
def ddpg_critic_loss_actor_variables() -> Step:
    actor = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="actor_dense")], name="actor")
    target_actor = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="t_actor_dense")])
    state_in, action_in = keras.Input((3,)), keras.Input((1,))
    joined = keras.layers.Concatenate()([state_in, action_in])
    critic = keras.Model([state_in, action_in], keras.layers.Dense(1, name="critic_dense")(joined))
    states, rewards = batch()
    actions = tf.ones((4, 1))

    def step():
        with tf.GradientTape() as tape:
            target_q = rewards[:, None] + 0.9 * critic([states * 0.5, target_actor(states * 0.5)])
            critic_loss = tf.reduce_mean(tf.square(target_q - critic([states, actions])))
        return tape.gradient(critic_loss, actor.trainable_variables), actor.trainable_variables

    return step


@case(
    source="tensorflow/tensorflow#26404 'Returned None Values when computing Gradients' and tensorlayer/SRGAN#143: "
    "model.variables includes BatchNormalization's moving_mean / moving_variance",
    both=Expectation({"bn/moving_mean": "not_trainable", "bn/moving_variance": "not_trainable"}, located=False),
)
def batchnorm_moving_stats_passed() -> Step:
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="bn_dense"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(1, name="bn_head"),
        ]
    )
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)[:, 0] - y))
        return tape.gradient(loss, model.variables), model.variables

    return step


@case(
    source="hand-written self-attention whose value projection is computed but never used (keras-team/keras#12521: "
    "'weights that were defined but left unused'); no report of exactly this attention slip found",
    both=Expectation(pair("value", "not_on_loss_path")),
)
def attention_value_unused() -> Step:
    class SelfAttention(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.query = keras.layers.Dense(4, name="query")
            self.key = keras.layers.Dense(4, name="key")
            self.value = keras.layers.Dense(3, name="value")

        def call(self, inputs):
            q, k, v = self.query(inputs), self.key(inputs), self.value(inputs)  # CULPRIT  # noqa: F841
            weights = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / 2.0)
            return tf.matmul(weights, inputs)

    layer, seq = SelfAttention(name="attn"), sequence()
    layer(seq)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(seq) - 0.5))
        return tape.gradient(loss, layer.trainable_variables), layer.trainable_variables

    return step


@case(
    source="keras MultiHeadAttention(return_attention_scores=True) trained on the scores only (attention "
    "distillation; cf. tensorflow/tensorflow#22775, only one output of a layer used); no exact public report found",
    both=Expectation({**pair("value", "not_on_loss_path"), **pair("attention_output", "not_on_loss_path")}),
)
def mha_trained_on_scores_only() -> Step:
    mha = keras.layers.MultiHeadAttention(num_heads=1, key_dim=2, name="mha")
    seq = sequence()
    mha(seq, seq)
    teacher_scores = tf.fill((2, 1, 4, 4), 0.25)

    def step():
        with tf.GradientTape() as tape:
            _, scores = mha(seq, seq, return_attention_scores=True)  # CULPRIT
            loss = tf.reduce_mean(tf.square(scores - teacher_scores))
        return tape.gradient(loss, mha.trainable_variables), mha.trainable_variables

    return step


@case(
    source="keras-team/keras#9130 'tf.py_func causes ValueError: None values not supported' and "
    "cleverhans-lab/cleverhans#432: tf.py_func (NumPy code) in a Lambda layer between two Dense layers",
    both=Expectation(pair("pyfunc_in", NONDIFF), op="PyFunc"),
)
def py_func_lambda_layer() -> Step:
    def numpy_sinh(t):
        out = tf.compat.v1.py_func(np.sinh, [t], tf.float32)  # CULPRIT
        out.set_shape(t.shape)
        return out

    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(3, name="pyfunc_in")(inputs)
    transformed = keras.layers.Lambda(numpy_sinh, output_shape=(3,))(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, name="pyfunc_out")(transformed))
    x, y = batch()

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)[:, 0] - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step


@case(
    source="rstudio/keras3#515 (a custom loss that computes only on y_true fails with no gradient); here y_pred is "
    "used only through tf.shape: the target is broadcast to the prediction's shape and compared with itself",
    both=Expectation({**pair("shape_hidden", "loss_disconnected"), **pair("shape_out", "loss_disconnected")}),
)
def loss_uses_only_prediction_shape() -> Step:
    class Regressor(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(4, activation="relu", name="shape_hidden")
            self.out = keras.layers.Dense(1, name="shape_out")

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    model, (x, y) = Regressor(), batch()
    model(x)

    def step():
        with tf.GradientTape() as tape:
            y_pred = model(x)
            baseline = tf.broadcast_to(tf.reduce_mean(y), tf.shape(y_pred))
            loss = tf.reduce_mean(tf.square(y[:, None] - baseline))  # CULPRIT
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    return step
