"""The TensorFlow side shared by the overhead benchmarks (``coherence_overhead.py``,
``aggregation_overhead.py``): thread pools, models, loss, optimizer, Keras's train
function as a timed method, the random batch and the report's first and last lines.

Importing this module imports TensorFlow but runs no op: a script imports it after
parsing its arguments and calls :func:`use_threads` before anything else.
"""
from __future__ import annotations

import os
import platform
import sys
import time

from keras_coherence import models
from keras_coherence import keras, tf
from keras_coherence.coherence.registry import rule_for

# The models docs/benchmarks.md was measured with, 10 classes: on 28x28x1 inputs the MLP
# 784-512-512-10 and Conv(32)-Pool-Conv(64)-Pool-Dense(128)-Dense(10); on 64 token ids a
# 2-block Transformer encoder (embedding 128, 4 heads, feed-forward 512).
_BUILDERS = {"mlp": models.mlp, "cnn": models.small_cnn,
             "transformer": lambda name: models.text_transformer(num_classes=10, name=name)}
SEQUENCE_LENGTH, VOCAB_SIZE = 64, 1000


def use_threads(threads):
    """Set the intra-op and inter-op thread pools (0 = TensorFlow's choice). The pools
    are created by the first op, so this must come before any op runs."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as err:  # pragma: no cover - only if an import ran an op
        sys.exit(f"could not set the thread pools ({err}): an op ran before the benchmark set them")


def build(name):
    """A fresh, uncompiled ``"mlp"``, ``"cnn"`` or ``"transformer"`` (logits), named ``name``."""
    return _BUILDERS[name](name=name)


def loss_obj(**kw):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kw)


def sgd(lr=0.01):
    return keras.optimizers.SGD(learning_rate=lr)


def require_rules(model):
    """Fail loudly if a layer would take the slow generic fallback: the benchmark would
    then measure the fallback, not the per-layer (ghost-norm) rules."""
    for layer in model.layers:
        if layer.trainable_weights:
            rule, reason = rule_for(layer)
            if rule is None:
                raise SystemExit(f"layer {layer.name} has no per-layer rule ({reason})")


def keras_step(model, data):
    """One call of the compiled model's own train function on the next batch of ``data``."""
    fn = model.make_train_function()
    iterator = iter(data)
    return lambda: fn(iterator)


def random_batch(size, seed, model="mlp"):
    """Random inputs for ``model`` and labels in 0..9 (op seeds ``seed``, ``seed + 1``):
    MNIST-shaped values in [0, 1), or for ``"transformer"`` token ids in [1, 1000) (no
    padding)."""
    if model == "transformer":
        x = tf.random.uniform((size, SEQUENCE_LENGTH), 1, VOCAB_SIZE, dtype=tf.int32, seed=seed)
    else:
        x = tf.random.uniform((size, 28, 28, 1), seed=seed)
    y = tf.random.uniform((size,), maxval=10, dtype=tf.int32, seed=seed + 1)
    return x, y


def print_header(title, args):
    """Print what the timings depend on; returns the start, for :func:`print_load`."""
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    print(f"{title}: TF {tf.__version__}, tf_keras {keras.__version__}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"intra/inter-op threads {tf.config.threading.get_intra_op_parallelism_threads()}/"
          f"{tf.config.threading.get_inter_op_parallelism_threads()}, batch {args.batch_size}, "
          f"{args.rounds} rounds, load average {load0[0]:.2f}")
    return t_start, load0


def print_load(start):
    """The load average at the start and now, and the seconds since ``start``: a load
    well above the thread count means the timings waited for cores."""
    t_start, load0 = start
    load1 = os.getloadavg()
    print(f"\nload average {load0[0]:.2f} at start, {load1[0]:.2f} at end; "
          f"{time.perf_counter() - t_start:.0f} s in all")


def litert_runner(fn, specs, feeds, folder, name, outputs):
    """Converts ``fn`` (TensorSpecs ``specs``) with builtins only, opens it in LiteRT
    without XNNPACK (as ``python -m edge train`` does) and returns a zero-argument
    callable that feeds ``feeds`` (one array per spec, in order), invokes, and stores the
    first output in ``outputs[name]``."""
    from edge.runner import open_interpreter

    concrete = tf.function(fn, input_signature=specs, autograph=False).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path = os.path.join(folder, f"{name}.tflite")
    with open(path, "wb") as f:
        f.write(converter.convert())
    interp = open_interpreter(path)
    interp.allocate_tensors()
    inputs = sorted(interp.get_input_details(), key=lambda d: d["index"])
    out = interp.get_output_details()[0]["index"]

    def run():
        for d, value in zip(inputs, feeds):
            interp.set_tensor(d["index"], value)
        interp.invoke()
        outputs[name] = interp.get_tensor(out)

    return run
