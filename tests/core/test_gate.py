"""The report and the gate keep the diagnosis when Keras raises 'No gradients provided for any variable', in every
mode; ``check --json`` prints nothing but the JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from tests.core.helpers import gradtel_script

# Every gradient is None: the loss is computed from the labels only. Keras raises at the first step (while the
# step is traced in graph modes), so no step ever runs. The script prints before training, as scripts do.
SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras, tensorflow as tf
    mode = sys.argv[1]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d1"), keras.layers.Dense(1, name="d2")])
    x, y = np.ones((16, 4), "float32"), np.ones((16, 1), "float32")
    print("training starts")

    def labels_only(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true))  # LOSS LINE

    if mode in ("fit", "fit_eager", "fit_xla"):
        model.compile(optimizer="adam", loss=labels_only, run_eagerly=mode == "fit_eager",
                      jit_compile=mode == "fit_xla")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    else:
        optimizer = keras.optimizers.Adam()

        def step():
            with tf.GradientTape() as tape:
                loss = labels_only(y, model(x))
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

        step = tf.function(step, jit_compile=mode == "loop_xla") if mode != "loop_eager" else step
        step()
""")
LOSS_LINE = next(n for n, text in enumerate(SCRIPT.splitlines(), 1) if "# LOSS LINE" in text)
VARIABLES = {"d1/kernel", "d1/bias", "d2/kernel", "d2/bias"}


def _run(tmp_path, *args: str, mode: str) -> subprocess.CompletedProcess:
    return gradtel_script(tmp_path, SCRIPT, *args, mode=mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fit", "fit_eager", "fit_xla", "loop_graph", "loop_eager", "loop_xla"])
def test_a_step_that_raises_keeps_its_diagnosis_in_the_report_and_fails_the_gate(tmp_path, mode):
    done = _run(tmp_path, "check", "--json", "--report", str(tmp_path / "report.json"), mode=mode)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "training starts" in done.stderr and "training starts" not in done.stdout
    report = json.loads(done.stdout)  # stdout holds the JSON alone
    assert report == json.loads((tmp_path / "report.json").read_text()) | {"generated_at": report["generated_at"]}
    (optimizer,) = report["optimizers"]
    assert optimizer["raised"].startswith("No gradients provided for any variable")
    variables = {v["name"].split("/", 1)[1]: v for v in report["variables"]}
    assert set(variables) == VARIABLES
    for v in variables.values():
        assert v["status"] == "missing" and not v["expected"]
        assert v["cause"]["category"] == "loss_disconnected"
        assert v["cause"]["location"].endswith(f"train.py:{LOSS_LINE}")
    (finding,) = report["findings"]
    assert finding["category"] == "loss_disconnected" and len(finding["variables"]) == 4


# Two optimizers; the generator's first step comes after five critic steps. A third optimizer is created and never
# steps (as compile() makes one that a custom train_step ignores).
TWO_OPTIMIZERS = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, name="g")], name="gen")
    critic = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="c")], name="critic")
    g_opt, c_opt = keras.optimizers.Adam(name="g_opt"), keras.optimizers.Adam(name="c_opt")
    idle = keras.optimizers.RMSprop(name="idle_opt")
    real = np.ones((8, 4), "float32")

    @tf.function
    def critic_step():
        with tf.GradientTape() as tape:
            fake = critic(generator(tf.ones((8, 2))))
            loss = tf.reduce_mean(tf.nn.softplus(fake)) + tf.reduce_mean(tf.nn.softplus(-critic(real)))
        c_opt.apply(tape.gradient(loss, critic.trainable_variables), critic.trainable_variables)

    @tf.function
    def generator_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.softplus(-critic(generator(tf.ones((8, 2))))))
        g_opt.apply(tape.gradient(loss, generator.trainable_variables), generator.trainable_variables)

    for _ in range(1_000_000):  # ended by gradtel check
        for _ in range(5):
            critic_step()
        generator_step()
""")


@pytest.mark.slow
def test_check_measures_every_optimizer_and_names_the_one_that_never_stepped(tmp_path):
    done = gradtel_script(tmp_path, TWO_OPTIMIZERS, "check", "--steps", "2", "--timeout", "3", "--json", mode=None)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    steps = {o["name"]: o["steps"] for o in report["optimizers"]}
    assert steps["g_opt"] >= 2 and steps["c_opt"] >= 10 and steps["idle_opt"] == 0
    assert {v["name"] for v in report["variables"]} == {
        "gen/g/kernel",
        "gen/g/bias",
        "critic/c/kernel",
        "critic/c/bias",
    }
    assert "optimizer(s) idle_opt took fewer than 2 step(s)" in done.stderr


@pytest.mark.slow
def test_run_prints_the_findings_on_stderr(tmp_path):
    done = _run(tmp_path, "run", mode="loop_graph")
    assert done.returncode == 1  # the script's own fate: Keras raised
    summary = [line for line in done.stderr.splitlines() if line.startswith("gradtel: ")]
    assert summary[0].startswith("gradtel: optimizers: adam (0 steps, raised: No gradients provided")
    assert summary[1].startswith("gradtel: loss_disconnected: ") and summary[1].endswith(f"train.py:{LOSS_LINE})")
    assert "d1/kernel" in summary[1]


# The keras-io GAN's shape: compile(d_optimizer, g_optimizer) calls super().compile(), which makes a default
# optimizer (RMSprop) that the custom train_step never steps. fit runs until gradtel check ends it.
KERAS_IO_GAN = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras

    class GAN(keras.Model):
        def __init__(self):
            super().__init__()
            self.generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, name="g")], name="gen")
            self.critic = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="c")], name="critic")

        def compile(self, d_optimizer, g_optimizer):
            super().compile()
            self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

        def train_step(self, real):
            noise = tf.ones((tf.shape(real)[0], 2))
            with tf.GradientTape() as tape:
                fake = self.critic(self.generator(noise))
                loss = tf.reduce_mean(tf.nn.softplus(fake)) + tf.reduce_mean(tf.nn.softplus(-self.critic(real)))
            grads = tape.gradient(loss, self.critic.trainable_variables)
            self.d_optimizer.apply(grads, self.critic.trainable_variables)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.softplus(-self.critic(self.generator(noise))))
            grads = tape.gradient(loss, self.generator.trainable_variables)
            self.g_optimizer.apply(grads, self.generator.trainable_variables)
            return {"loss": loss}

    gan = GAN()
    gan.compile(keras.optimizers.Adam(name="d_opt"), keras.optimizers.Adam(name="g_opt"))
    gan.fit(np.ones((64, 4), "float32"), batch_size=8, epochs=1_000_000, verbose=0)  # ended by gradtel check
""")


@pytest.mark.slow
def test_check_does_not_wait_for_the_optimizer_compile_made_beside_a_gans_own(tmp_path):
    """With a 600 s --timeout, only the rule ends this check within the helper's 180 s: the model's compile()
    default never got a gradient while the optimizers the model holds stepped."""
    done = gradtel_script(tmp_path, KERAS_IO_GAN, "check", "--steps", "2", "--timeout", "600", "--json", mode=None)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = {o["name"]: o["steps"] for o in json.loads(done.stdout)["optimizers"]}
    assert steps["d_opt"] >= 2 and steps["g_opt"] >= 2 and steps["rm_sprop"] == 0, steps
    assert "gradtel check: not waiting for rm_sprop: the optimizer model.compile() made" in done.stderr
    assert "took fewer than" not in done.stderr
