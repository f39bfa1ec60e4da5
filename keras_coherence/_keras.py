"""The one place that decides which Keras the package uses.

tfmot and larq only work on Keras 2 (``tf_keras``), so ``tf.keras`` must resolve to
``tf_keras``. TensorFlow reads ``TF_USE_LEGACY_KERAS`` when it is first imported, so
this module sets it when TensorFlow is not imported yet, and refuses to go on when
TensorFlow was already imported with Keras 3 (mixing the two gives confusing errors
far from their cause).
"""
import os
import sys

_LEGACY_VALUES = ("true", "True", "1")
_HOW_TO_FIX = (
    "keras_coherence needs Keras 2 (the tf_keras package), but TensorFlow was already "
    "imported with Keras 3. Fix it in one of two ways: import keras_coherence before "
    "anything imports tensorflow, or start Python with TF_USE_LEGACY_KERAS=1 in the "
    "environment (e.g. `export TF_USE_LEGACY_KERAS=1`)."
)


def _ensure_legacy_keras():
    value = os.environ.get("TF_USE_LEGACY_KERAS")
    if value is not None and value not in _LEGACY_VALUES:
        raise ImportError(
            f"TF_USE_LEGACY_KERAS={value!r} asks TensorFlow for Keras 3. " + _HOW_TO_FIX
        )
    tf_module = sys.modules.get("tensorflow")
    if tf_module is not None and not getattr(tf_module, "_tf_uses_legacy_keras", False):
        raise ImportError(_HOW_TO_FIX)
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


_ensure_legacy_keras()

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if tf.keras.Model is not keras.Model:  # pragma: no cover - defensive
    raise ImportError(_HOW_TO_FIX)

__all__ = ["keras", "tf"]


def in_output_shape_inference():
    """True while tf_keras builds a functional model and calls a layer only to learn its
    output's shape and dtype: the call runs in a throw-away graph that tf_keras names
    ``<layer name>_scratch_graph`` (``Layer._infer_output_signature`` and
    ``compute_output_shape``). What a layer computes there is discarded, so an
    expensive exact computation (a PO2 exponent search) may skip it there."""
    graph = tf.compat.v1.get_default_graph()
    return not tf.executing_eagerly() and graph.name.endswith("_scratch_graph")


def autocast_variables(layer):
    """The scope in which tf_keras runs ``layer.call``: under a mixed-precision policy
    (``mixed_float16``/``mixed_bfloat16``) its float32 variables read as the layer's
    compute dtype, as Keras's own forward pass sees them. Outside it they read as
    float32, and a rule's forward would mix dtypes."""
    from tf_keras.src.mixed_precision.autocast_variable import enable_auto_cast_variables

    return enable_auto_cast_variables(layer._compute_dtype_object)


def loss_scaler(optimizer):
    """``optimizer`` if it is a ``keras.mixed_precision.LossScaleOptimizer`` (what Keras
    compiles under ``mixed_float16``), else None: the object whose ``get_scaled_loss`` /
    ``get_unscaled_gradients`` a custom step must call."""
    return optimizer if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer) else None


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process: on by default on
    CPUs with AVX-512, off on others (e.g. AMD EPYC without it) and under
    ``TF_ENABLE_ONEDNN_OPTS=0``. The two kernel sets favour different formulations of
    the same product (see the convolution rule)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())
