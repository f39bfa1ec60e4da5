"""Hardware-friendly power-of-two weight quantizers (Bae, Zielinski, Chatterjee 2022).

``MSQEPo2Baseline`` ("msqe_po2_baseline"), ``MSQEPo2`` ("msqe_po2") and ``LearnedPo2``
("learned_po2") are Keras layers; ``get`` / ``serialize`` / ``deserialize`` resolve
them like Keras activations. ``TFMOTQuantizer`` (imported on first use, it pulls in
tfmot) runs any of them inside tfmot quantization-aware training.

Quantization-aware training and integer export (``qat``, ``export``, ``folding``;
imported on first use):

* ``quantize_model(model, bits=4, method="msqe", per_channel=True,
  fold_batchnorm=True, activation_bits=8)``: a tfmot QAT model with PO2 weight
  quantizers (``PO2QuantizeConfig`` / ``PO2KernelQuantizer``) and BN folded into
  the convolutions (``fold_batchnorm``, ``FoldedConv2D``, ``FoldedDepthwiseConv2D``);
* ``to_integer_tflite(model)``: integer TFLite bytes whose weight scales are exact powers of
  two with zero point 0 (read back and checked; ``allow_float_scales=True`` opts
  out); ``integer_weights(model)``: the same integers and exponents per layer
  (``IntegerKernel``); ``freeze_quantizers``, ``tflite_kernels``, ``run_tflite``;
* saving: ``model.save("qat.keras")`` and ``load_model(path)`` (or
  ``keras.models.load_model(path, custom_objects=custom_objects())``, or inside
  ``quantize_scope()``) restore every variable, PO2 exponents included.

Monitoring (``monitor``; imported on first use): ``ScaleMonitor(every_n_steps=1)``,
a Keras callback recording every PO2 quantizer's exponents, exponent flips, clip
fraction and (gradient-weighted) MSQE during ``fit``, into the logs, a per-layer
``history``, ``to_csv`` and ``plot``.

``litert_rounding(model, kernels="optimized")`` (``litert``): a context manager under
which the QAT model's inference runs LiteRT's integer arithmetic (Q31 multipliers, two
roundings per requantization, ADD / MEAN / QUANTIZE as its kernels compute them), so
Keras gives the exported file's int8 outputs exactly (``run_tflite(..., kernels=...)``).
``qat_evaluate`` (``evaluate``): QAT, export and Keras/TFLite accuracies in one call.
"""
from keras_coherence.quantization.base import PO2Quantizer
from keras_coherence.quantization.quantizers import (
    ALIASES,
    LearnedPo2,
    MSQEPo2,
    MSQEPo2Baseline,
    deserialize,
    get,
    serialize,
)

__all__ = [
    "PO2Quantizer",
    "MSQEPo2Baseline",
    "MSQEPo2",
    "LearnedPo2",
    "TFMOTQuantizer",
    "ALIASES",
    "get",
    "serialize",
    "deserialize",
    "FoldedConv2D",
    "FoldedDepthwiseConv2D",
    "fold_batchnorm",
    "quantize_model",
    "quantize_scope",
    "custom_objects",
    "load_model",
    "PO2QuantizeConfig",
    "PO2KernelQuantizer",
    "freeze_quantizers",
    "unfreeze_quantizers",
    "to_integer_tflite",
    "integer_weights",
    "IntegerKernel",
    "tflite_kernels",
    "run_tflite",
    "ScaleMonitor",
    "litert_rounding",
    "qat_evaluate",
]

_LAZY = {
    "TFMOTQuantizer": "tfmot_adapter",
    "FoldedConv2D": "folding",
    "FoldedDepthwiseConv2D": "folding",
    "fold_batchnorm": "folding",
    "quantize_model": "qat",
    "quantize_scope": "qat",
    "custom_objects": "qat",
    "load_model": "qat",
    "PO2QuantizeConfig": "qat",
    "PO2KernelQuantizer": "qat",
    "freeze_quantizers": "qat",
    "unfreeze_quantizers": "qat",
    "to_integer_tflite": "export",
    "to_tflite": "export",  # deprecated alias of to_integer_tflite
    "integer_weights": "export",
    "IntegerKernel": "export",
    "tflite_kernels": "export",
    "run_tflite": "export",
    "ScaleMonitor": "monitor",
    "litert_rounding": "litert",
    "qat_evaluate": "evaluate",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
