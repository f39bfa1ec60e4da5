"""Binary neural networks trained standard or with low memory (Wang et al., arXiv 2102.04270).

* :mod:`~keras_coherence.binary.config` -- :class:`LowMemoryConfig`, ``resolve_method``.
* :mod:`~keras_coherence.binary.ops` -- hand-written, TFLite-builtin-only backward passes.
* :mod:`~keras_coherence.binary.real_ops` -- the same for the real-valued layers (batch
  norm, ReLU, pools, real convolutions) of the standard_device baseline and ResNetE-18.
* :mod:`~keras_coherence.binary.layers` -- ``BinaryDense``, ``BinaryConv2D``,
  ``L1BatchNormalization``, ``LowMemoryMaxPooling2D`` and the ``Device*`` layers
  (Keras layers with a builtin-only backward).
* :mod:`~keras_coherence.binary.models` -- MLP, CNV, BinaryNet, ResNetE-18 builders.
* :mod:`~keras_coherence.binary.memory` -- ``memory_profile``: training memory in bits.
* :mod:`~keras_coherence.binary.training` -- ``train_bnn``: one call for a CLI.
* :mod:`~keras_coherence.binary.export_lce` -- LCE inference export (``to_lce``, ``compare``).
* :mod:`~keras_coherence.binary.export_training` -- builtin-only on-device training model
  (``TrainingModule``, ``to_training_tflite``).

Names are imported lazily (larq is only imported when a standard model is built).
"""
import importlib

_EXPORTS = {
    "LowMemoryConfig": "config", "resolve_method": "config", "method_name": "config",
    "METHODS": "config",
    "BinaryDense": "layers", "BinaryConv2D": "layers", "L1BatchNormalization": "layers",
    "LowMemoryMaxPooling2D": "layers", "DeviceBatchNormalization": "layers",
    "DeviceConv2D": "layers", "DeviceReLU": "layers", "DeviceMaxPooling2D": "layers",
    "DeviceAveragePooling2D": "layers",
    "build_binary_model": "models", "BINARY_MODELS": "models", "MODEL_NAMES": "models",
    "memory_profile": "memory", "MemoryProfile": "memory", "MemoryRow": "memory",
    "train_bnn": "training", "make_optimizer": "training",
    "to_lce": "export_lce", "larq_inference_model": "export_lce",
    "TrainingModule": "export_training", "to_training_tflite": "export_training",
    "set_keras_weights": "export_training",
}
# Deprecated aliases (removed in 0.2.0): attribute access works, ``__all__`` leaves them out.
_DEPRECATED = {"build_model": "models", "to_tflite": "export_training"}
_SUBMODULES = ("config", "ops", "real_ops", "layers", "models", "memory", "training", "export_lce",
               "export_training")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _DEPRECATED:
        return getattr(importlib.import_module(f"{__name__}.{_DEPRECATED[name]}"), name)
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
