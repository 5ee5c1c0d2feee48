"""Diagnosis mechanisms that the per-case corpus cannot express: several optimizers in one eager loop, causes set
up before the step (build(), tf.data), eager and graph agreeing on shape-only ops, evidence for left_tensorflow,
and the linear-cost zero hints agreeing with a per-variable walk."""

from __future__ import annotations

import inspect
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from gradtel.diagnosis import Diagnoser
from gradtel.naming import variable_path


def _line_of(marker: str, function) -> str:
    """``file:line`` of the line of ``function``'s source that contains ``marker``."""
    lines, first = inspect.getsourcelines(function)
    (offset,) = [i for i, line in enumerate(lines) if marker in line and "_line_of(" not in line]
    return f"{os.path.basename(inspect.getsourcefile(function))}:{first + offset}"


def _causes(handle) -> dict[str, tuple[str, str | None]]:
    out = {}
    for table in handle._tables.values():
        for i, cause in table.causes.items():
            out[table.names[i]] = (cause.category, os.path.basename(cause.location or ""))
    return out


def test_every_optimizer_of_an_eager_loop_gets_its_first_step_diagnosed(instrumented_cleanup) -> None:
    """A GAN-like loop: the second optimizer's first step comes after the first's, and raises (every gradient
    None), so it has no next step: its cause must come from that first step."""
    generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="g")], name="gen")
    critic = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="c")], name="critic")
    g_opt, c_opt = keras.optimizers.SGD(0.01), keras.optimizers.SGD(0.01)
    g_handle = gradtel.instrument(g_opt, name="generator", start_exporter=False)
    gradtel.instrument(c_opt, name="critic", start_exporter=False)
    real = tf.ones((4, 3))
    raised = None
    for _ in range(3):
        with tf.GradientTape() as tape:
            c_loss = tf.reduce_mean(critic(generator(tf.ones((4, 2))))) - tf.reduce_mean(critic(real))
        c_opt.apply(tape.gradient(c_loss, critic.trainable_variables), critic.trainable_variables)
        with tf.GradientTape() as tape:
            g_loss = -tf.reduce_mean(critic(real))  # the bug: the generator is not called in its own step
        try:
            g_opt.apply(tape.gradient(g_loss, generator.trainable_variables), generator.trainable_variables)
        except ValueError as error:
            raised = error
            break
    assert raised is not None and "gen/g/kernel: unused" in str(raised)
    assert _causes(g_handle) == {"gen/g/kernel": ("unused", ""), "gen/g/bias": ("unused", "")}


def test_a_pending_set_is_recorded_on_its_own_next_step_whatever_steps_between(diagnoser: Diagnoser) -> None:
    """Two optimizers alternate; the second's missing set appears in an unrecorded step. The first optimizer's
    cached steps in between must not stop the recording the second one waits for."""
    a, b = keras.layers.Dense(1, name="a"), keras.layers.Dense(1, name="b")
    aux = keras.layers.Dense(1, name="aux")
    for layer in (a, b, aux):
        layer.build((None, 3))
    x = tf.ones((2, 3))

    def step(layer, use_aux):
        with tf.GradientTape() as tape:
            out = layer(x)
            extra = aux(x)  # read, but reaches the loss only when use_aux
            loss = tf.reduce_mean(out + (extra if use_aux else 0.0))
        variables = layer.trainable_variables + aux.trainable_variables
        return diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)

    step(a, True)  # recorded; the recorder disarms once nothing waits
    step(a, True)
    pending = step(b, False)  # a new missing set, unrecorded: pending
    assert {c.category for c in pending.causes.values()} == {"unknown"}
    for _ in range(3):
        step(a, True)  # another optimizer's cached steps
    full = step(b, False)
    assert sorted(c.category for c in full.causes.values()) == ["not_on_loss_path", "not_on_loss_path"]


def test_shape_only_ops_agree_in_eager_and_graph(diagnoser: Diagnoser) -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="shape_only")])
    x, y = tf.ones((4, 3)), tf.ones((4, 1))

    def step():
        with tf.GradientTape() as tape:
            pred = model(x)
            loss = tf.reduce_mean(tf.square(tf.zeros_like(pred) + tf.cast(tf.size(pred), tf.float32) - y))
        return tape.gradient(loss, model.trainable_variables), model.trainable_variables

    grads, variables = step()
    eager = diagnoser.diagnose(list(grads), list(variables))
    box = {}

    @tf.function
    def traced():
        grads, variables = step()
        box["graph"] = diagnoser.diagnose(list(grads), list(variables))
        return tf.constant(0)

    traced()
    for result in (eager, box["graph"]):
        assert {c.category for c in result.causes.values()} == {"loss_disconnected"}
        assert all(c.op is None for c in result.causes.values())


def test_unused_head_fed_from_numpy_is_not_left_tensorflow(diagnoser: Diagnoser) -> None:
    """NumPy inputs and labels converted inside the tape are not a round trip through NumPy."""
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, name="trunk")(inputs)
    heads = [keras.layers.Dense(1, name="main")(hidden), keras.layers.Dense(1, name="spare")(hidden)]
    model = keras.Model(inputs, heads)
    x, y = np.ones((4, 3), np.float32), np.ones((4, 1), np.float32)
    diagnoser.expect_optimizer()
    with tf.GradientTape() as tape:
        main, _spare = model(x)
        loss = keras.losses.MeanSquaredError()(y, main)
    grads = tape.gradient(loss, model.trainable_variables)
    result = diagnoser.diagnose(list(grads), model.trainable_variables)
    names = {variable_path(model.trainable_variables[i]): c.category for i, c in result.causes.items()}
    assert names == {"spare/kernel": "not_on_loss_path", "spare/bias": "not_on_loss_path"}


def _pipeline_program(mode: str):
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="enc")], name="encoder")
    head = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="head")], name="head_model")
    optimizer = keras.optimizers.SGD(0.1)
    handle = gradtel.instrument(optimizer, start_exporter=False)
    data = tf.data.Dataset.from_tensor_slices((np.ones((8, 3), np.float32), np.ones((8, 1), np.float32)))
    data = data.batch(4).map(lambda x, y: (encoder(x), y))  # MAP LINE
    variables = encoder.trainable_variables + head.trainable_variables

    def step(features, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(head(features) - y))
        optimizer.apply(tape.gradient(loss, variables), variables)

    step = tf.function(step) if mode == "graph" else step
    for features, y in data:
        step(features, y)
    return handle


def test_model_applied_in_dataset_map_is_outside_tape_at_the_map_line(instrumented_cleanup) -> None:
    where = _line_of("# MAP LINE", _pipeline_program)
    for mode in ("eager", "graph"):
        causes = _causes(_pipeline_program(mode))
        assert causes == {"encoder/enc/kernel": ("outside_tape", where), "encoder/enc/bias": ("outside_tape", where)}


class _WeightNormDense(keras.layers.Layer):
    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel")
        self.unit_kernel = self.kernel / tf.norm(self.kernel)  # DERIVED ONCE

    def call(self, inputs):
        return tf.matmul(inputs, self.unit_kernel)


def test_kernel_derived_in_build_is_outside_tape_at_the_build_line_in_graph_mode(instrumented_cleanup) -> None:
    """The layer is built (eagerly, while the diagnoser records) before the traced step captures the stale value."""
    gradtel.instrument(keras.optimizers.SGD(0.1), start_exporter=False)  # installs and arms the diagnoser
    layer = _WeightNormDense(name="wn")
    x, y = tf.ones((4, 3)), tf.ones((4, 1))
    layer(x)
    optimizer = keras.optimizers.SGD(0.1)
    handle = gradtel.instrument(optimizer, start_exporter=False)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x) - y))
        optimizer.apply(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables)

    try:
        step()
    except ValueError as error:  # Keras: no gradients provided for any variable
        assert "wn/kernel: outside_tape" in str(error)
    assert _causes(handle) == {"wn/kernel": ("outside_tape", _line_of("# DERIVED ONCE", _WeightNormDense))}


def test_mixed_precision_path_hints_underflow(diagnoser: Diagnoser) -> None:
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="half")])
    finally:
        keras.mixed_precision.set_global_policy(policy)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.cast(model(tf.ones((4, 3))), tf.float32))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g.dtype == tf.float32 for g in grads)  # float32 variables: the float16 is on the path only
    result = diagnoser.diagnose(list(grads), model.trainable_variables)
    assert {h.category for h in result.zero_hints.values()} == {"underflow"}
    assert len(result.zero_hints) == 2


def test_zero_hints_of_many_variables_match_a_walk_per_variable(diagnoser: Diagnoser) -> None:
    """The one-pass tables name, for each variable, the newest gating op on its path: check them against a
    direct walk (descendants of the variable, the ReLU nodes among their consumers) on a branching model."""
    inputs = keras.Input((3,))
    branches = [keras.layers.Dense(2, activation="relu", name=f"b{i}")(inputs) for i in range(6)]
    merged = keras.layers.Concatenate()(branches)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="relu", name="top")(merged))
    box = {}

    @tf.function
    def traced():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(tf.ones((2, 3))))
        grads = tape.gradient(loss, model.trainable_variables)
        box["result"] = diagnoser.diagnose(list(grads), list(model.trainable_variables))
        return loss

    traced()
    hints = {variable_path(model.trainable_variables[i]): h for i, h in box["result"].zero_hints.items()}
    assert set(hints) == {v.path for v in model.trainable_variables}
    assert {h.category for h in hints.values()} == {"dead_activation"}
    # Every branch's newest ReLU on the path to the loss is the top layer's, created after the branches' own.
    top = hints["top/kernel"].location
    assert all(h.op == "Relu" and h.location == top for h in hints.values())


def test_python_float_round_trip_is_left_tensorflow_but_a_constant_factor_is_not(diagnoser: Diagnoser) -> None:
    x = tf.ones((4, 3))
    escaped = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="escaped")])
    with tf.GradientTape() as tape:
        value = float(tf.reduce_mean(escaped(x)))  # FLOAT
        loss = tf.square(tf.constant(value) - 1.0)
    result = diagnoser.diagnose(list(tape.gradient(loss, escaped.trainable_variables)), escaped.trainable_variables)
    where = _line_of("# FLOAT", test_python_float_round_trip_is_left_tensorflow_but_a_constant_factor_is_not)
    assert {(c.category, os.path.basename(c.location)) for c in result.causes.values()} == {("left_tensorflow", where)}

    diagnoser.expect_optimizer()  # record the next step
    unrelated = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="unrelated")])
    with tf.GradientTape() as tape:
        unrelated(x)
        loss = tf.reduce_sum(tf.ones((4, 1))) * 2.0  # a loss from the labels only, scaled by a Python float
    grads = tape.gradient(loss, unrelated.trainable_variables)
    result = diagnoser.diagnose(list(grads), unrelated.trainable_variables)
    assert {c.category for c in result.causes.values()} == {"loss_disconnected"}


def test_a_value_logged_with_float_and_a_python_constant_in_the_loss_is_no_round_trip(diagnoser: Diagnoser) -> None:
    """An auxiliary output copied out for logging, its loss term forgotten, and a Python constant in the loss: the
    constant is not the copy, and the loss depends on other variables, so nothing shows a round trip. The copy
    could still have come back through Python maths, so the answer is unknown, never left_tensorflow."""
    x = tf.ones((4, 3))
    main = keras.layers.Dense(1, name="main")
    aux = keras.layers.Dense(1, name="aux")
    with tf.GradientTape() as tape:
        print(float(tf.reduce_mean(aux(x))))  # LOGGED
        loss = 0.5 * tf.reduce_mean(tf.square(main(x)))
    variables = main.trainable_variables + aux.trainable_variables
    result = diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)
    causes = {variable_path(variables[i]): c for i, c in result.causes.items()}
    assert {name: c.category for name, c in causes.items()} == {"aux/kernel": "unknown", "aux/bias": "unknown"}
    where = _line_of("# LOGGED", test_a_value_logged_with_float_and_a_python_constant_in_the_loss_is_no_round_trip)
    assert all(where in c.explanation for c in causes.values())


def test_an_integer_made_inside_a_called_tf_function_is_blamed_in_its_body(diagnoser: Diagnoser) -> None:
    """Eager mode, a tf.function returning top_k's indices: the op is the body's TopKV2, as in graph mode."""
    x = tf.reshape(tf.range(24, dtype=tf.float32), (2, 4, 3))
    scorer = keras.layers.Dense(1, name="scorer")

    @tf.function
    def top(scores):
        return tf.math.top_k(scores, k=2).indices  # TOPK

    with tf.GradientTape() as tape:
        picked = tf.gather(x, top(tf.squeeze(scorer(x), -1)), batch_dims=1)
        loss = tf.reduce_sum(picked)
    result = diagnoser.diagnose(list(tape.gradient(loss, scorer.trainable_variables)), scorer.trainable_variables)
    where = _line_of("# TOPK", test_an_integer_made_inside_a_called_tf_function_is_blamed_in_its_body)
    assert {(c.category, c.op, os.path.basename(c.location)) for c in result.causes.values()} == {
        ("non_differentiable_op", "TopKV2", where)
    }


def test_a_variable_used_in_both_branches_of_a_cond_gets_no_untaken_branch_hint(diagnoser: Diagnoser) -> None:
    """One of a cond's branches always runs: a variable whose paths enter both is no untaken branch's."""
    x = tf.ones((2, 3))
    shared, only = keras.layers.Dense(1, name="shared"), keras.layers.Dense(1, name="only")
    shared(x), only(x)  # built before the trace
    variables = shared.trainable_variables + only.trainable_variables
    box = {}

    @tf.function
    def step(flag):
        with tf.GradientTape() as tape:
            a = shared(x)
            loss = tf.reduce_sum(tf.cond(flag, lambda: a * 2.0, lambda: a + only(x)))
        box["result"] = diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)
        return loss

    step(tf.constant(True))
    hints = {variable_path(variables[i]): h.category for i, h in box["result"].zero_hints.items()}
    assert hints == {"only/kernel": "untaken_branch", "only/bias": "untaken_branch"}


def test_a_loss_made_from_a_gradient_taken_after_the_outer_tape_is_outside_the_tape(diagnoser: Diagnoser) -> None:
    """tensorflow/tensorflow#41510: forces (a gradient) taken after the outer tape's block feed its loss. The eager
    recorder does not record backward ops; the gradient call stands for them, so the loss is not 'computed from
    nothing' (loss_disconnected) but from values made while the outer tape was not recording."""
    x = tf.reshape(tf.range(6, dtype=tf.float32), (2, 3))
    w = tf.Variable(tf.ones((3, 2)), name="w")
    with tf.GradientTape() as outer, tf.GradientTape() as inner:
        inner.watch(x)
        energy = tf.reduce_sum(tf.tanh(x @ w))
    forces = inner.gradient(energy, x)
    loss = tf.reduce_mean(tf.square(forces - 1.0))  # LOSS
    result = diagnoser.diagnose([outer.gradient(loss, w)], [w])
    where = _line_of("# LOSS", test_a_loss_made_from_a_gradient_taken_after_the_outer_tape_is_outside_the_tape)
    assert [(c.category, os.path.basename(c.location)) for c in result.causes.values()] == [("outside_tape", where)]


def test_a_variable_read_only_before_the_tape_is_not_said_to_be_read_inside_it(diagnoser: Diagnoser) -> None:
    """A fresh copy made before the tape (tf.Variable(w)) and trained in w's place: w is read, but never while the
    tape records, so not_on_loss_path ('read inside the tape') has no evidence."""
    x = tf.ones((2, 3))
    w = tf.Variable(tf.ones((3, 1)), name="w")
    copy = tf.Variable(w)  # COPY
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(x @ copy)
    result = diagnoser.diagnose([tape.gradient(loss, w)], [w])
    (cause,) = result.causes.values()
    where = _line_of("# COPY", test_a_variable_read_only_before_the_tape_is_not_said_to_be_read_inside_it)
    assert cause.category == "unknown" and where in cause.explanation


def test_a_fast_path_read_beside_other_unexplained_inputs_is_linked(diagnoser: Diagnoser) -> None:
    """tensorflow/tensorflow#14894: tf.histogram_fixed_width(variable, range, nbins) in eager mode. The variable is
    read in C++ beside other inputs no recorded op made (the range, the int32 bin count); matching the read to its
    input must not compare tensors with == (an Equal op: it failed on int32 against float32, and the whole op went
    unrecorded, so the loss looked computed from no variable: loss_disconnected)."""
    v = tf.Variable([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], name="values")
    value_range = tf.constant([0.0, 10.0])
    with tf.GradientTape() as tape:
        counts = tf.histogram_fixed_width(v, value_range, 11)  # HISTOGRAM
        loss = tf.reduce_sum(tf.cast(counts, tf.float32))
    result = diagnoser.diagnose([tape.gradient(loss, v)], [v])
    where = _line_of("# HISTOGRAM", test_a_fast_path_read_beside_other_unexplained_inputs_is_linked)
    assert [(c.category, c.op, os.path.basename(c.location)) for c in result.causes.values()] == [
        ("non_differentiable_op", "HistogramFixedWidth", where)
    ]


def _actor_critic(sample_with_numpy: bool):
    """One persistent tape, two losses with the same sources, two optimizers each given every variable (an A2C
    loop, tensorflow#48547): the actor's loss stops at the critic's value, the critic's never reads the actor."""
    inputs = keras.Input((4,))
    trunk = keras.layers.Dense(8, activation="relu", name="trunk")(inputs)
    model = keras.Model(
        inputs,
        [keras.layers.Dense(2, activation="softmax", name="actor")(trunk), keras.layers.Dense(1, name="critic")(trunk)],
    )
    actor_opt, critic_opt = keras.optimizers.SGD(0.01), keras.optimizers.SGD(0.01)
    actor_handle = gradtel.instrument(actor_opt, name="actor_opt", start_exporter=False)
    critic_handle = gradtel.instrument(critic_opt, name="critic_opt", start_exporter=False)
    rng = np.random.default_rng(0)
    for _ in range(2):
        with tf.GradientTape(persistent=True) as tape:
            probs, value = model(np.ones((1, 4), np.float32))  # READ
            if sample_with_numpy:  # the action is drawn in NumPy; the return comes back as a NumPy number
                p = np.squeeze(probs.numpy()).astype("float64")
                action = int(rng.choice(2, p=p / p.sum()))
                ret = np.float32(1.0 + action)
            else:
                action, ret = 0, 1.0  # a NumPy number here would leave the critic's case in doubt (unknown)
            advantage = ret - tf.stop_gradient(value[0, 0])  # STOP
            actor_loss = -tf.math.log(probs[0, action]) * advantage
            critic_loss = tf.square(value[0, 0] - ret)
        actor_grads = tape.gradient(actor_loss, model.trainable_variables)
        critic_grads = tape.gradient(critic_loss, model.trainable_variables)
        del tape
        actor_opt.apply_gradients(zip(actor_grads, model.trainable_variables, strict=True))
        critic_opt.apply_gradients(zip(critic_grads, model.trainable_variables, strict=True))
    return _causes(actor_handle), _causes(critic_handle)


def test_two_optimizers_fed_from_one_persistent_tape_are_each_matched_to_their_own_gradient_call(
    instrumented_cleanup,
) -> None:
    """The actor's optimizer gets the actor loss's gradients (matched by identity, not to the newest call, the
    critic's), and the critic's optimizer sees the reads made before the actor's optimizer stepped."""
    actor, critic = _actor_critic(sample_with_numpy=False)
    stop, read = _line_of("# STOP", _actor_critic), _line_of("# READ", _actor_critic)
    assert actor == dict.fromkeys(["critic/kernel", "critic/bias"], ("stop_gradient", stop))
    assert critic == dict.fromkeys(["actor/kernel", "actor/bias"], ("not_on_loss_path", read))


def test_probabilities_copied_out_to_sample_an_action_are_no_round_trip(instrumented_cleanup) -> None:
    """The actor's probabilities go to NumPy to draw an action, and a NumPy number (the return) enters the critic's
    loss: nothing shows that number is the copy, so the critic's missing actor gradients are unknown, not
    left_tensorflow (a NumPy array with the copy's batch dimension would be)."""
    actor, critic = _actor_critic(sample_with_numpy=True)
    assert actor == dict.fromkeys(
        ["critic/kernel", "critic/bias"], ("stop_gradient", _line_of("# STOP", _actor_critic))
    )
    assert critic == dict.fromkeys(["actor/kernel", "actor/bias"], ("unknown", ""))


def test_numpy_maths_on_a_copied_batch_is_left_tensorflow(diagnoser: Diagnoser) -> None:
    """An auxiliary head's batch copied out, clipped in NumPy and brought back into a loss that also depends on
    another head: the array that came back has the copy's batch dimension."""
    x = tf.ones((4, 3))
    main = keras.layers.Dense(1, name="main")
    aux = keras.layers.Dense(1, name="aux")
    with tf.GradientTape() as tape:
        clipped = np.clip(aux(x).numpy(), 0.0, 1.0)  # COPIED
        loss = tf.reduce_mean(tf.square(main(x))) + tf.reduce_mean(tf.convert_to_tensor(clipped))
    variables = main.trainable_variables + aux.trainable_variables
    result = diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)
    where = _line_of("# COPIED", test_numpy_maths_on_a_copied_batch_is_left_tensorflow)
    causes = {variable_path(variables[i]): (c.category, os.path.basename(c.location)) for i, c in result.causes.items()}
    assert causes == dict.fromkeys(["aux/kernel", "aux/bias"], ("left_tensorflow", where))


def test_a_clip_inside_a_cond_branch_leaves_the_branch_in_doubt(diagnoser: Diagnoser) -> None:
    """A dice loss whose ``if`` became a cond (keras#2994): every path runs inside the branch and through a clip.
    The branch may not have run, or the clip saturated (it did, and the branch ran): other, naming both; a
    variable used in a branch with no clip keeps untaken_branch."""
    x = tf.ones((2, 3))
    clipped, plain = keras.layers.Dense(1, name="clipped"), keras.layers.Dense(1, name="plain")
    clipped(x), plain(x)
    variables = clipped.trainable_variables + plain.trainable_variables
    box = {}

    @tf.function
    def step(flag):
        with tf.GradientTape() as tape:
            score = tf.reduce_sum(tf.clip_by_value(clipped(x), 0.7, 1.0))  # CLIP
            loss = tf.cond(flag, lambda: score + tf.reduce_sum(plain(x)), lambda: tf.constant(0.0))
        box["result"] = diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)
        return loss

    step(tf.constant(True))
    hints = {variable_path(variables[i]): h for i, h in box["result"].zero_hints.items()}
    assert {name: h.category for name, h in hints.items()} == {
        "clipped/kernel": "other",
        "clipped/bias": "other",
        "plain/kernel": "untaken_branch",
        "plain/bias": "untaken_branch",
    }
    where = _line_of("# CLIP", test_a_clip_inside_a_cond_branch_leaves_the_branch_in_doubt)
    assert where in hints["clipped/kernel"].explanation


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("sliced", [False, True], ids=["scatter", "slice"])
def test_a_value_written_into_part_of_another_variable_is_a_stateful_assign(
    diagnoser: Diagnoser, mode: str, sliced: bool
) -> None:
    """``v`` reaches the loss only by being scattered (or slice-assigned) into ``table``, which the loss reads
    (tensorflow#21925): a partial write is a write, which has no gradient; not 'nothing reaches the loss'."""
    v = tf.Variable([1.0, 2.0], name="v")
    table = tf.Variable(tf.zeros((3, 2)), trainable=False, name="table")
    box = {}

    def step():
        with tf.GradientTape() as tape:
            if sliced:
                table[1].assign(v * 2.0)
            else:
                table.scatter_update(tf.IndexedSlices(v[None, :] * 2.0, tf.constant([1])))
            loss = tf.reduce_sum(table * 3.0)
        box["result"] = diagnoser.diagnose([tape.gradient(loss, v)], [v])

    diagnoser.expect_optimizer()
    (tf.function(step) if mode == "graph" else step)()
    cause = box["result"].causes[0]
    op = "ResourceStridedSliceAssign" if sliced else "ResourceScatterUpdate"
    assert (cause.category, cause.op) == ("stateful_assign", op)


def test_a_variable_that_only_decides_a_cond_is_cut_where_its_path_turns_boolean(diagnoser: Diagnoser) -> None:
    """A mixture-of-experts gate through ``K.switch`` (tensorflow#35334): the gate reaches the loss only through the
    cond's predicate, which has no gradient: non_differentiable_op at the comparison, not not_on_loss_path."""
    x = tf.ones((2, 3))
    gate, expert_a, expert_b = (keras.layers.Dense(1, name=n) for n in ("gate", "expert_a", "expert_b"))
    gate(x), expert_a(x), expert_b(x)
    variables = gate.trainable_variables + expert_a.trainable_variables + expert_b.trainable_variables
    box = {}

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            use_a = tf.reduce_mean(gate(x)) > 0.0  # GREATER
            loss = tf.reduce_sum(tf.cond(use_a, lambda: expert_a(x), lambda: expert_b(x)))
        box["result"] = diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)

    step()
    causes = {variable_path(variables[i]): c for i, c in box["result"].causes.items()}
    where = _line_of("# GREATER", test_a_variable_that_only_decides_a_cond_is_cut_where_its_path_turns_boolean)
    assert {name: (c.category, c.op, os.path.basename(c.location)) for name, c in causes.items()} == dict.fromkeys(
        ["gate/kernel", "gate/bias"], ("non_differentiable_op", "Greater", where)
    )


def test_numpy_numbers_in_the_loss_after_an_unseen_read_leave_the_cause_in_doubt(diagnoser: Diagnoser) -> None:
    """``np.log(probs[0, a])`` reads the tensor through NumPy's buffer protocol, which no hook sees
    (SciSharp/TensorFlow.NET#1197, the keras.io actor-critic with log-probabilities kept in NumPy); NumPy numbers
    then enter a loss that another head keeps connected. Not not_on_loss_path: unknown, naming both."""
    x = tf.ones((1, 3))
    actor = keras.layers.Dense(2, activation="softmax", name="actor")
    critic = keras.layers.Dense(1, name="critic")
    with tf.GradientTape() as tape:
        probs, value = actor(x), critic(x)
        log_prob = np.log(probs[0, 0])  # a NumPy float32, read unseen
        loss = -tf.constant(log_prob) * 0.5 + tf.reduce_sum(tf.square(value))
    variables = actor.trainable_variables + critic.trainable_variables
    result = diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)
    causes = {variable_path(variables[i]): c.category for i, c in result.causes.items()}
    assert causes == {"actor/kernel": "unknown", "actor/bias": "unknown"}


def test_a_variable_that_only_decides_a_python_if_is_cut_where_its_path_turns_boolean(diagnoser: Diagnoser) -> None:
    """The eager twin of the cond predicate: ``if tf.reduce_mean(gate(x)) > 0`` picks an expert in Python; the gate's
    path turns boolean at the comparison (non_differentiable_op there), as a tf.cond's predicate does in a trace."""
    x = tf.ones((2, 3))
    gate, expert_a, expert_b = (keras.layers.Dense(1, name=n) for n in ("gate", "expert_a", "expert_b"))
    gate(x), expert_a(x), expert_b(x)
    variables = gate.trainable_variables + expert_a.trainable_variables + expert_b.trainable_variables
    with tf.GradientTape() as tape:
        expert = expert_a if tf.reduce_mean(gate(x)) > -1e9 else expert_b  # GREATER
        loss = tf.reduce_sum(expert(x))
    result = diagnoser.diagnose(list(tape.gradient(loss, variables)), variables)
    causes = {variable_path(variables[i]): c for i, c in result.causes.items()}
    where = _line_of("# GREATER", test_a_variable_that_only_decides_a_python_if_is_cut_where_its_path_turns_boolean)
    gate_causes = {n: (c.category, c.op, os.path.basename(c.location)) for n, c in causes.items() if "gate" in n}
    assert gate_causes == dict.fromkeys(["gate/kernel", "gate/bias"], ("non_differentiable_op", "Greater", where))
