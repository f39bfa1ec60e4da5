"""keras-coherence: see and steer how gradient descent generalizes, and ship the result
to fixed-point and binary edge hardware.

Importing the package makes ``tf.keras`` resolve to Keras 2 (``tf_keras``); use
``keras_coherence.keras`` to get that module.
"""
from keras_coherence._keras import keras, tf  # noqa: F401  (sets the Keras 2 policy first)

__version__ = "0.1.0"

from keras_coherence import data  # noqa: E402,F401
from keras_coherence import coherence  # noqa: E402,F401
from keras_coherence import callbacks  # noqa: E402,F401
from keras_coherence import aggregation  # noqa: E402,F401
from keras_coherence import optimizers  # noqa: E402,F401
from keras_coherence.coherence import gradient_stats, CoherenceStats  # noqa: E402,F401

# Imported on first attribute access (they pull in tfmot, larq and LCE, or matplotlib):
# ``kc.quantization.quantize_model`` works without an explicit ``import``.
_LAZY = ("quantization", "binary", "models", "plots")

__all__ = ["keras", "data", "coherence", "callbacks", "aggregation", "optimizers", "gradient_stats",
           "CoherenceStats", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"keras_coherence.{name}")
    raise AttributeError(f"module 'keras_coherence' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
