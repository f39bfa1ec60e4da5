"""Run in a fresh process: aggregators and RM3 under MirroredStrategy (2 logical CPUs)
make the same updates as one device on the same global batches."""
import json
import sys
import warnings

import numpy as np

import keras_coherence as kc
from keras_coherence._keras import keras, tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
warnings.simplefilter("ignore")


def build():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    out = keras.layers.Dense(3)(h)
    return keras.Model(inp, out)


rng = np.random.default_rng(0)
x = rng.normal(size=(36, 6)).astype("float32")
y = rng.integers(0, 3, 36)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
arms = ["winsorized:c=2", "winsorized:percentile=20", "m3:groups=3", "m3:groups=4", "rm3"]
results = {}
for label, strategy in (("one", tf.distribute.get_strategy()),
                        ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    results[label] = {"replicas": strategy.num_replicas_in_sync}
    for arm in arms:
        with strategy.scope():
            if arm == "rm3":
                model = build()
                model.compile(kc.optimizers.RunningMedian(keras.optimizers.SGD(0.2)), loss)
            else:
                model = kc.aggregation.with_aggregator(build(), arm)
                model.compile(keras.optimizers.SGD(0.2), loss)
        model.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
        results[label][arm] = [w.tolist() for w in model.get_weights()]
json.dump(results, sys.stdout)
