"""The Keras callbacks watch the optimizers a model really steps: a GAN's ``train_step`` with its own optimizers."""

from __future__ import annotations

import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import gradtel
from gradtel.callback import IdleOptimizerWarning
from gradtel.keras import GradientTelemetry
from gradtel.tf_keras import GradientTelemetry as LegacyTelemetry
from tests.core.helpers import by_name, numpy_norm

REAL = np.random.default_rng(3).normal(size=(24, 2)).astype("float32")
BATCH = 8  # 3 batches per epoch


class TinyGAN:
    """The keras-io GAN pattern on a given Keras: ``compile(d_optimizer, g_optimizer)`` calls ``super().compile()``
    (which makes a default optimizer) and keeps its own two, which ``train_step`` steps.

    ``hold`` is how the model keeps them: ``"attributes"`` (``self.d_optimizer``), ``"dict"`` (one dict attribute)
    or ``"closure"`` (out of gradtel's sight). ``step_generator=False`` is a ``train_step`` that forgets the
    generator's update."""

    @staticmethod
    def build(lib, hold: str = "attributes", step_generator: bool = True):
        class GAN(lib.Model):
            def __init__(self):
                super().__init__()
                self.discriminator = lib.Sequential(
                    [
                        lib.Input((2,)),
                        lib.layers.Dense(3, activation="tanh", name="d_hidden"),
                        lib.layers.Dense(1, name="d_out"),
                    ],
                    name="discriminator",
                )
                self.generator = lib.Sequential([lib.Input((3,)), lib.layers.Dense(2, name="g_out")], name="generator")

            def compile(self, d_optimizer, g_optimizer):
                super().compile()
                if hold == "attributes":
                    self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
                elif hold == "dict":
                    self.optimizers_by_part = {"d": d_optimizer, "g": g_optimizer}
                else:
                    self.pair = lambda: (d_optimizer, g_optimizer)

            def optimizer_pair(self):
                if hold == "attributes":
                    return self.d_optimizer, self.g_optimizer
                if hold == "dict":
                    return self.optimizers_by_part["d"], self.optimizers_by_part["g"]
                return self.pair()

            def noise(self, real):
                return tf.concat([real, real[:, :1]], axis=1)  # deterministic: a replay sees the same inputs

            def discriminator_gradients(self, real):
                fake = self.generator(self.noise(real))
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.nn.softplus(-self.discriminator(real))) + tf.reduce_mean(
                        tf.nn.softplus(self.discriminator(fake))
                    )
                return tape.gradient(loss, self.discriminator.trainable_weights)

            def generator_gradients(self, real):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.nn.softplus(-self.discriminator(self.generator(self.noise(real)))))
                return tape.gradient(loss, self.generator.trainable_weights)

            def train_step(self, data):
                real = data[0] if isinstance(data, tuple) else data
                d_optimizer, g_optimizer = self.optimizer_pair()
                d_grads = self.discriminator_gradients(real)
                d_optimizer.apply_gradients(zip(d_grads, self.discriminator.trainable_weights, strict=True))
                if step_generator:
                    g_grads = self.generator_gradients(real)
                    g_optimizer.apply_gradients(zip(g_grads, self.generator.trainable_weights, strict=True))
                return {"real_mean": tf.reduce_mean(real)}  # Keras 3 needs a non-empty result

        return GAN()


def fit_gan(lib, telemetry, hold="attributes", step_generator=True, epochs=1):
    model = TinyGAN.build(lib, hold, step_generator)
    model.compile(lib.optimizers.Adam(learning_rate=0.05), lib.optimizers.Adam(learning_rate=0.05))
    initial = (model.discriminator.get_weights(), model.generator.get_weights())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(REAL, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[telemetry])
    idle = [str(w.message) for w in caught if issubclass(w.category, IdleOptimizerWarning)]
    return model, initial, idle


def replay_last_norms(initial):
    """The last step's gradient norms, computed eagerly without gradtel: the same steps on a copy of the model."""
    copy = TinyGAN.build(keras)
    copy.discriminator.set_weights(initial[0])
    copy.generator.set_weights(initial[1])
    d_optimizer, g_optimizer = keras.optimizers.Adam(learning_rate=0.05), keras.optimizers.Adam(learning_rate=0.05)
    for start in range(0, len(REAL), BATCH):
        real = tf.constant(REAL[start : start + BATCH])
        d_grads = copy.discriminator_gradients(real)
        d_optimizer.apply_gradients(zip(d_grads, copy.discriminator.trainable_weights, strict=True))
        g_grads = copy.generator_gradients(real)
        g_optimizer.apply_gradients(zip(g_grads, copy.generator.trainable_weights, strict=True))
    d_norms = {v.path: numpy_norm(g) for v, g in zip(copy.discriminator.trainable_weights, d_grads, strict=True)}
    g_norms = {v.path: numpy_norm(g) for v, g in zip(copy.generator.trainable_weights, g_grads, strict=True)}
    return d_norms, g_norms


def test_keras3_gan_both_train_step_optimizers_are_measured_and_the_compile_default_is_dropped(caplog):
    telemetry = GradientTelemetry(name="gan", start_exporter=False)
    with caplog.at_level(logging.INFO, logger="gradtel"):
        model, initial, idle = fit_gan(keras, telemetry)

    assert idle == []  # the GAN pattern working as written is not a warning
    assert set(telemetry.handles) == {"d_optimizer", "g_optimizer"}
    d_handle, g_handle = telemetry.handles["d_optimizer"], telemetry.handles["g_optimizer"]
    assert (d_handle.name, g_handle.name) == ("gan/d_optimizer", "gan/g_optimizer")
    assert telemetry.handle is d_handle
    assert d_handle.totals()[0] == 3 and g_handle.totals()[0] == 3  # 24 / 8 batches, each optimizer once per batch

    d_norms, g_norms = replay_last_norms(initial)
    for handle, expected in ((d_handle, d_norms), (g_handle, g_norms)):
        records = by_name(handle)
        assert set(records) == set(expected)  # every variable of its sub-model, no other
        for path, norm in expected.items():
            assert records[path].steps == 3 and records[path].state == "ok"
            # abs: the replay runs three Adam steps eagerly where fit ran them compiled; float32 op order (oneDNN's
            # threaded reductions) moves a near-zero gradient's norm by ~1e-7 (seen: 2.8043e-4 against 2.8035e-4)
            assert records[path].norm == pytest.approx(norm, rel=1e-4, abs=1e-6)
        assert handle.totals()[1] == pytest.approx(np.sqrt(sum(n * n for n in expected.values())), rel=1e-4)

    # compile()'s default optimizer never stepped: one INFO line names it, and gradtel stops watching it.
    assert not gradtel.is_instrumented(model.optimizer)
    dropped = [r.getMessage() for r in caplog.records if "took no step during fit" in r.getMessage()]
    assert dropped == [
        "gradtel: model.optimizer ('gan/optimizer', made by model.compile()) took no step during fit; "
        "train_step stepped gan/d_optimizer, gan/g_optimizer. gradtel stops watching model.optimizer."
    ]
    compiled = [h for h in gradtel.instrumenting.handles() if h.name == "gan/optimizer"]
    assert [h.totals()[0] for h in compiled] == [0] and not compiled[0].active

    # A second fit with the same callback keeps the same handles and counts on; the default stays unwatched.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(REAL, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[telemetry])
    assert not [w for w in caught if issubclass(w.category, IdleOptimizerWarning)]
    assert telemetry.handles == {"d_optimizer": d_handle, "g_optimizer": g_handle}
    assert d_handle.totals()[0] == 6 and g_handle.totals()[0] == 6
    assert not gradtel.is_instrumented(model.optimizer)


def test_keras3_train_step_that_forgets_an_optimizer_is_warned_about():
    telemetry = GradientTelemetry(name="forgetful", start_exporter=False)
    _, _, idle = fit_gan(keras, telemetry, step_generator=False)
    assert idle == [
        "gradtel: optimizer(s) g_optimizer ('forgetful/g_optimizer') held by the model took no step during fit "
        "while d_optimizer did: the variables they should train are not being updated "
        "(does train_step apply their gradients?)"
    ]
    assert telemetry.handles["d_optimizer"].totals()[0] == 3
    assert telemetry.handles["g_optimizer"].totals()[0] == 0


def test_keras3_optimizers_held_out_of_sight_leave_a_warning_not_a_silent_zero():
    telemetry = GradientTelemetry(start_exporter=False)
    model, _, idle = fit_gan(keras, telemetry, hold="closure")
    assert len(idle) == 1
    assert idle[0].startswith("gradtel: no optimizer the model holds took a step during fit (optimizer (")
    assert "hold it as a model attribute" in idle[0]
    assert telemetry.handle.totals()[0] == 0 and gradtel.is_instrumented(model.optimizer)


@pytest.mark.parametrize(("lib", "callback"), [(keras, GradientTelemetry), (tf_keras, LegacyTelemetry)])
def test_optimizers_in_a_dict_are_labelled_by_key(lib, callback):
    """Keras 3 keeps a dict attribute as a TrackedDict, tf_keras as a _DictWrapper proxy: both are read."""
    telemetry = callback(name=f"bykey-{lib.__name__}", start_exporter=False)
    model, _, idle = fit_gan(lib, telemetry, hold="dict")
    assert idle == []
    assert {label: h.name for label, h in telemetry.handles.items()} == {
        "optimizers_by_part[d]": f"bykey-{lib.__name__}/optimizers_by_part[d]",
        "optimizers_by_part[g]": f"bykey-{lib.__name__}/optimizers_by_part[g]",
    }
    assert [h.totals()[0] for h in telemetry.handles.values()] == [3, 3]
    assert not gradtel.is_instrumented(model.optimizer)


def test_keras3_a_loss_scale_wrapper_is_watched_in_place_of_its_inner_optimizer_also_held():
    model = TinyGAN.build(keras)
    inner = keras.optimizers.Adam(learning_rate=0.05)
    model.compile(keras.optimizers.LossScaleOptimizer(inner), keras.optimizers.Adam(learning_rate=0.05))
    model.d_inner = inner  # held twice: alone and inside its wrapper
    telemetry = GradientTelemetry(name="scaled", start_exporter=False)
    model.fit(REAL, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[telemetry])
    assert set(telemetry.handles) == {"d_optimizer", "g_optimizer"}
    assert not gradtel.is_instrumented(inner)
    assert telemetry.handles["d_optimizer"].totals()[0] == 3  # each step once, through the wrapper
    assert int(inner.iterations.numpy()) == 3


@pytest.mark.parametrize("optimizer", [tf_keras.optimizers.Adam, tf_keras.optimizers.legacy.Adam])
def test_tf_keras_gan_both_train_step_optimizers_are_measured(optimizer):
    model = TinyGAN.build(tf_keras)
    model.compile(optimizer(learning_rate=0.05), optimizer(learning_rate=0.05))
    telemetry = LegacyTelemetry(name=f"tfk-gan-{optimizer.__module__}", start_exporter=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(REAL, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[telemetry])
    assert not [w for w in caught if issubclass(w.category, IdleOptimizerWarning)]
    assert set(telemetry.handles) == {"d_optimizer", "g_optimizer"}
    for label, part in (("d_optimizer", model.discriminator), ("g_optimizer", model.generator)):
        records = by_name(telemetry.handles[label])
        assert len(records) == len(part.trainable_weights)
        assert all(r.steps == 6 and r.state == "ok" and r.norm > 0 for r in records.values())
    assert not gradtel.is_instrumented(model.optimizer)
