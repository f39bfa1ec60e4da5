"""Run in a fresh process: aggregators and RM3 under MirroredStrategy (2 logical CPUs)
make the same updates as one device on the same global batches."""
import json
import sys
import warnings

import _distributed_setup as setup  # two logical CPUs: configured before any op runs

import keras_coherence as kc
from keras_coherence._keras import keras

warnings.simplefilter("ignore")
x, y = setup.random_data(36)
# M3's 3 groups of a batch of 12 straddle the two replicas; percentile winsorization
# runs across two processes in multiworker_check.py, through the same collectives.
# An activity regularizer's gradient differs between the replicas (it follows each one's
# examples), unlike a weight regularizer's: the "/activity" arm has one.
arms = ["winsorized:c=2", "m3:groups=3", "rm3", "winsorized:c=2/activity"]
results = {}
for label, strategy in setup.strategies():
    results[label] = {"replicas": strategy.num_replicas_in_sync}
    for arm in arms:
        with strategy.scope():
            if arm == "rm3":
                model = setup.build((8, "relu"))
                model.compile(kc.optimizers.RunningMedian(keras.optimizers.SGD(0.2)), setup.LOSS)
            elif arm.endswith("/activity"):
                keras.utils.set_random_seed(0)
                inputs = keras.Input((6,))
                h = keras.layers.Dense(8, activation="relu", activity_regularizer=keras.regularizers.L2(0.05))(inputs)
                model = kc.aggregation.with_aggregator(keras.Model(inputs, keras.layers.Dense(3)(h)),
                                                       arm.partition("/")[0])
                model.compile(keras.optimizers.SGD(0.2), setup.LOSS)
            else:
                model = kc.aggregation.with_aggregator(setup.build((8, "relu")), arm)
                model.compile(keras.optimizers.SGD(0.2), setup.LOSS)
        model.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
        results[label][arm] = [w.tolist() for w in model.get_weights()]
json.dump(results, sys.stdout)
