"""Set-up shared by the distributed check scripts (``distributed_check.py``,
``distributed_aggregation_check.py``), which test_distributed.py runs in fresh processes.

Importing this module splits the CPU into two logical devices: that must happen before
TensorFlow initializes its runtime, so the scripts import it before running any op.
"""
import numpy as np

from keras_coherence._keras import keras, tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def strategies():
    """``(label, strategy)``: one device, and MirroredStrategy over the two logical CPUs."""
    return (("one", tf.distribute.get_strategy()),
            ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])))


def random_data(n):
    """``n`` examples of 6 normal features and labels in 0..2 (numpy seed 0)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.integers(0, 3, n)
    return x, y


def build(*hidden):
    """Input(6) -> ``Dense(units, activation)`` for each ``(units, activation)`` in
    ``hidden`` -> Dense(3) logits, with the initial weights of seed 0."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = inp
    for units, activation in hidden:
        h = keras.layers.Dense(units, activation=activation)(h)
    out = keras.layers.Dense(3)(h)
    return keras.Model(inp, out)
