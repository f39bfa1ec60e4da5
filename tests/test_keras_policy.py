"""Importing the package makes tf.keras resolve to Keras 2, or fails clearly."""
import os
import subprocess
import sys


def _run(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    full_env.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_import_first_gives_tf_keras():
    proc = _run("import keras_coherence as kc, tensorflow as tf, tf_keras\n"
                "assert tf.keras.Model is tf_keras.Model is kc.keras.Model\nprint('ok')")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_tensorflow_imported_with_keras3_first_is_a_clear_error():
    proc = _run("import tensorflow\nimport keras_coherence")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "TF_USE_LEGACY_KERAS=1" in proc.stderr


def test_env_var_asking_for_keras3_is_a_clear_error():
    proc = _run("import keras_coherence", TF_USE_LEGACY_KERAS="0")
    assert proc.returncode != 0 and "Keras 3" in proc.stderr


def test_env_var_set_before_tensorflow_is_accepted():
    proc = _run("import tensorflow\nimport keras_coherence\nprint('ok')", TF_USE_LEGACY_KERAS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_output_shape_inference_is_detected_only_where_tf_keras_discards_the_call():
    """``in_output_shape_inference`` is True in the throw-away call tf_keras makes while
    building a functional model (and in ``compute_output_shape``), never in a call whose
    result is used: eager, a traced tf.function, predict, fit."""
    import numpy as np

    import keras_coherence  # noqa: F401
    from keras_coherence._internals.keras_private import in_output_shape_inference
    from keras_coherence._keras import keras, tf

    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(in_output_shape_inference())
            return x * 2.0

    inp = keras.Input((3,))
    probe = Probe()
    model = keras.Model(inp, probe(inp))  # functional construction
    assert seen == [True]
    probe.compute_output_shape((None, 3))
    assert seen[-1] is True
    x = np.ones((2, 3), np.float32)
    seen.clear()
    np.testing.assert_array_equal(model(x).numpy(), 2 * x)  # eager
    tf.function(lambda t: model(t))(x)  # traced
    model.predict(x, verbose=0)
    model.compile("sgd", "mse")
    model.fit(x, x, verbose=0)
    assert seen and not any(seen), seen
