"""The one place that decides which Keras the package uses.

tfmot and larq only work on Keras 2 (``tf_keras``), so ``tf.keras`` must resolve to
``tf_keras``. TensorFlow reads ``TF_USE_LEGACY_KERAS`` when it is first imported, so
this module sets it when TensorFlow is not imported yet, and refuses to go on when
TensorFlow was already imported with Keras 3 (mixing the two gives confusing errors
far from their cause).

Everything that reaches into TensorFlow's or tf_keras's private code lives in
``keras_coherence._internals``, not here.
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


def loss_scaler(optimizer):
    """``optimizer`` if it is a ``keras.mixed_precision.LossScaleOptimizer`` (what Keras
    compiles under ``mixed_float16``), else None: the object whose ``get_scaled_loss`` /
    ``get_unscaled_gradients`` a custom step must call."""
    return optimizer if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer) else None

