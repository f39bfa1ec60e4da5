"""Run in a fresh process (logical devices must be set before TensorFlow starts):
MirroredStrategy over 2 logical CPUs gives the same numbers as one device."""
import json
import sys

import numpy as np

import keras_coherence as kc
from keras_coherence._keras import keras, tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def build():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    h = keras.layers.Dense(5, activation="tanh")(h)
    out = keras.layers.Dense(3)(h)
    return keras.Model(inp, out)


rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6)).astype("float32")
y = rng.integers(0, 3, 32)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
results = {}
for label, strategy in (("one", tf.distribute.get_strategy()),
                        ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    with strategy.scope():
        model = kc.coherence.with_coherence(build())
        model.compile(keras.optimizers.SGD(0.1), loss)
    monitor = kc.callbacks.CoherenceMonitor(x[:20], y[:20])
    hist = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    results[label] = {
        "replicas": strategy.num_replicas_in_sync,
        "train_m_coherence": hist.history["m_coherence"],
        "probe": [r["m_coherence"] for r in monitor.history],
        "weights": [w.tolist() for w in model.get_weights()],
    }
json.dump(results, sys.stdout)
