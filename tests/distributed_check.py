"""Run in a fresh process (logical devices must be set before TensorFlow starts):
MirroredStrategy over 2 logical CPUs gives the same numbers as one device."""
import json
import sys

import _distributed_setup as setup  # two logical CPUs: configured before any op runs

import keras_coherence as kc
from keras_coherence._keras import keras

x, y = setup.random_data(32)
results = {}
for label, strategy in setup.strategies():
    with strategy.scope():
        model = kc.coherence.with_coherence(setup.build((8, "relu"), (5, "tanh")))
        model.compile(keras.optimizers.SGD(0.1), setup.LOSS)
    monitor = kc.callbacks.CoherenceMonitor(x[:20], y[:20])
    hist = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    results[label] = {
        "replicas": strategy.num_replicas_in_sync,
        "train_m_coherence": hist.history["m_coherence"],
        "probe": [r["m_coherence"] for r in monitor.history],
        "weights": [w.tolist() for w in model.get_weights()],
    }
json.dump(results, sys.stdout)
