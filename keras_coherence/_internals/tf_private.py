"""TensorFlow internals (TF 2.21): ``tensorflow.python`` and ``tf.__internal__``, the API
TensorFlow keeps for Keras.
"""
from keras_coherence._keras import tf


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process: on by default on
    CPUs with AVX-512, off on others (e.g. AMD EPYC without it) and under
    ``TF_ENABLE_ONEDNN_OPTS=0``. The two kernel sets favour different formulations of
    the same product (see the convolution rule)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def smart_cond(pred, true_fn, false_fn):
    """``true_fn()`` or ``false_fn()`` chosen in Python when ``pred`` has a static value (a
    bool, a constant tensor), else ``tf.cond``: what Keras layers do with ``training``, so
    that a constant mode traces one branch only."""
    return tf.__internal__.smart_cond.smart_cond(pred, true_fn, false_fn)
