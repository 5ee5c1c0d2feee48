"""Two logical CPU devices for MirroredStrategy tests: configured before TensorFlow initialises its devices."""

import contextlib

import tensorflow as tf

_cpus = tf.config.list_physical_devices("CPU")
# RuntimeError: devices already initialised by an earlier test module; the strategy tests then skip.
with contextlib.suppress(RuntimeError):
    tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
