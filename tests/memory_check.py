"""Run in a fresh process: peak memory of one winsorized step on a deep MLP whose
batch x parameters would be ~2.7 GB, printed as JSON."""
import json
import resource
import sys
import warnings

import numpy as np

import keras_coherence as kc
from keras_coherence._keras import keras

warnings.simplefilter("ignore")
depth, width, batch = 20, 512, 128
inp = keras.Input((width,))
h = inp
for _ in range(depth):
    h = keras.layers.Dense(width, activation="relu")(h)
model = kc.aggregation.with_aggregator(keras.Model(inp, keras.layers.Dense(10)(h)), "winsorized:c=1")
model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = np.random.default_rng(0).normal(size=(batch, width)).astype("float32")
y = np.zeros(batch, "int64")
model.predict(x[:2], verbose=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = model.count_params()
json.dump({"peak_increase": after - before, "batch_x_params_bytes": batch * params * 4,
           "batch_x_largest_layer_bytes": batch * (width * width + width) * 4}, sys.stdout)
