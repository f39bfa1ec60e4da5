"""One worker of a 2-worker MultiWorkerMirroredStrategy cluster on localhost, run by
test_multiworker.py in two processes:

    python multiworker_check.py TASK_INDEX PORT0 PORT1 OUT.json

Each case trains the same model twice on the same data and global batches: on one
device (the default strategy) and under the cluster's strategy (one CPU replica per
worker; Keras shards each global batch across the workers). The chief (task 0) writes
both results to OUT.json for the test to compare.
"""
import json
import os
import sys
import warnings

index, port0, port1, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"localhost:{port0}", f"localhost:{port1}"]},
    "task": {"type": "worker", "index": index},
})

import numpy as np  # noqa: E402

import keras_coherence as kc  # noqa: E402  (selects Keras 2 before TensorFlow starts)
from keras_coherence._keras import keras, tf  # noqa: E402

# The strategy must exist before any op runs (it configures the collective runtime).
STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
warnings.simplefilter("ignore")
tf.get_logger().setLevel("ERROR")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
rng = np.random.default_rng(0)
X = rng.normal(size=(36, 6)).astype("float32")
Y = rng.integers(0, 3, 36)


def build(hidden=((8, "relu"),), regularizer=None):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = inp
    for units, activation in hidden:
        h = keras.layers.Dense(units, activation=activation, kernel_regularizer=regularizer)(h)
    return keras.Model(inp, keras.layers.Dense(3)(h))


def coherence_case():
    # an L2 penalty: the update adds replicas x each replica's regularization gradient
    model = kc.coherence.with_coherence(build(((8, "relu"), (5, "tanh")), keras.regularizers.L2(0.05)))
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    monitor = kc.callbacks.CoherenceMonitor(X[:20], Y[:20])
    hist = model.fit(X[:32], Y[:32], batch_size=16, epochs=2, shuffle=False, verbose=0,
                     callbacks=[monitor])
    return {"train_m_coherence": hist.history["m_coherence"],
            "probe": [r["m_coherence"] for r in monitor.history],
            "weights": [w.tolist() for w in model.get_weights()]}


def aggregator_case(spec):
    def run():
        if spec == "rm3":
            model = build()
            model.compile(kc.optimizers.RunningMedian(keras.optimizers.SGD(0.2)), LOSS)
        else:
            model = kc.aggregation.with_aggregator(build(), spec)
            model.compile(keras.optimizers.SGD(0.2), LOSS)
        model.fit(X, Y, batch_size=12, epochs=2, shuffle=False, verbose=0)
        return {"weights": [w.tolist() for w in model.get_weights()]}
    return run


def qat_case():
    import keras_coherence.quantization  # noqa: F401

    qmodel = kc.quantization.quantize_model(build(((16, "relu"),)), bits=4, method="learned")
    qmodel.compile(keras.optimizers.SGD(0.1), LOSS)
    qmodel.fit(X, Y, batch_size=12, epochs=2, shuffle=False, verbose=0)
    return {"weights": [w.tolist() for w in qmodel.get_weights()]}


CASES = {"coherence": coherence_case, "qat": qat_case}
for spec in ("winsorized:c=2", "winsorized:percentile=20", "m3:groups=3", "rm3"):
    CASES[spec] = aggregator_case(spec)

results = {"replicas": STRATEGY.num_replicas_in_sync, "cases": {}}
for name, case in CASES.items():  # every worker takes part in every collective fit
    with STRATEGY.scope():
        results["cases"][name] = {"multiworker": case()}
if index == 0:  # the one-device references: the chief alone, after the collectives
    for name, case in CASES.items():
        results["cases"][name]["one"] = case()
    with open(out_path, "w") as f:
        json.dump(results, f)
