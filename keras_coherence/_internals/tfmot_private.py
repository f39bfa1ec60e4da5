"""tfmot internals (tensorflow-model-optimization 0.8): what its public API
(``tfmot.quantization.keras``) does not export.

* ``QuantizeLayer`` (the input quantizer ``quantize_apply`` inserts) and the default
  registries' output-only and no-op ``QuantizeConfig`` classes, from
  ``tensorflow_model_optimization.python.core.quantization.keras``;
* the two range ops of its activation quantizers, ``quant_ops.MovingAvgQuantize`` and
  ``quant_ops.AllValuesQuantize``: ``MovingAverageQuantizer`` and ``AllValuesQuantizer``
  look them up as module attributes at every call, so replacing the attribute changes every
  quantizer, existing ones included (how ``replica_ranges`` and ``calibrate_activations``
  change where ranges come from);
* the quantizers a ``QuantizeWrapper`` built, kept in its underscored attributes
  (``_weight_vars``, ``_quantize_activations``, ``_output_quantizers``,
  ``_output_quantizer_vars``) and a ``QuantizeAwareActivation``'s ``_post_activation_vars``.
"""
import contextlib
from typing import Callable, NamedTuple

from keras_coherence._keras import keras  # noqa: F401  (selects Keras 2 before tfmot imports TensorFlow)
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quant_ops, quantize_layer

QuantizeLayer = quantize_layer.QuantizeLayer


def default_quantize_configs(activation_bits):
    """``(output config factory, no-op config class)`` of tfmot's default registry for
    ``activation_bits``: the ``QuantizeConfig`` of a layer that quantizes only its output,
    and the one of a layer that quantizes nothing. 8 bits: ``default_8bit``; fewer: the
    experimental ``default_n_bit`` with 8-bit weights."""
    if activation_bits == 8:
        from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
            default_8bit_quantize_configs as configs,
        )

        return (lambda: configs.Default8BitOutputQuantizeConfig()), configs.NoOpQuantizeConfig
    from tensorflow_model_optimization.python.core.quantization.keras.experimental.default_n_bit import (
        default_n_bit_quantize_configs as configs,
    )

    kw = {"num_bits_weight": 8, "num_bits_activation": activation_bits}
    return (lambda: configs.DefaultNBitOutputQuantizeConfig(**kw)), configs.NoOpQuantizeConfig


# ----------------------------------------------------------------------------- range ops

class RangeOps(NamedTuple):
    """tfmot's range ops, as its activation quantizers call them: ``op(inputs, min_var,
    max_var, **options)`` updates the range variables (in training) and returns the
    fake-quantized inputs."""

    moving_average: Callable  # quant_ops.MovingAvgQuantize (MovingAverageQuantizer)
    all_values: Callable  # quant_ops.AllValuesQuantize (AllValuesQuantizer, a model's input)


def range_ops() -> RangeOps:
    """The range ops tfmot's quantizers call now."""
    return RangeOps(quant_ops.MovingAvgQuantize, quant_ops.AllValuesQuantize)


def set_range_ops(ops: RangeOps):
    """Every tfmot activation quantizer calls ``ops`` from now on."""
    quant_ops.MovingAvgQuantize, quant_ops.AllValuesQuantize = ops


@contextlib.contextmanager
def range_ops_replaced(ops: RangeOps):
    """Every tfmot activation quantizer calls ``ops`` within the block, the previous ones
    after it (an exception included)."""
    previous = range_ops()
    set_range_ops(ops)
    try:
        yield
    finally:
        set_range_ops(previous)


def fake_quant_with_min_max_vars(inputs, min_var, max_var, per_channel, num_bits, narrow_range):
    """tfmot's fake quantization of ``inputs`` with the range ``[min_var, max_var]`` (what its
    range ops apply after updating the range)."""
    return quant_ops._FakeQuantWithMinMaxVars(inputs, min_var, max_var, per_channel=per_channel,
                                              num_bits=num_bits, narrow_range=narrow_range)


# ----------------------------------------------------------------------------- a wrapper's quantizers

def weight_quantizers(layer):
    """``[(weight, quantizer, quantizer variables), ...]`` of a built ``QuantizeWrapper``;
    ``[]`` for any other layer."""
    return getattr(layer, "_weight_vars", None) or []


def output_quantizers(layer):
    """The list of a built ``QuantizeWrapper``'s output quantizers (the wrapper's own list:
    an item set in it replaces that quantizer); ``[]`` for a wrapper without one or any
    other layer."""
    return getattr(layer, "_output_quantizers", None) or []


def post_activation_quantizer(wrapper):
    """The ``QuantizeAwareActivation`` of a ``QuantizeWrapper`` whose activation is
    quantized after it is applied (its ``quantizer`` may be replaced), or None."""
    activations = wrapper._quantize_activations
    if activations and getattr(activations[0], "_post_activation_vars", None):
        return activations[0]
    return None


def output_range_vars(layer):
    """The min/max variables of the quantizer that quantizes ``layer``'s output, or None: a
    ``QuantizeLayer``'s, a ``QuantizeWrapper``'s output quantizer's, or its activation's
    quantizer's when that one quantizes after the activation."""
    if isinstance(layer, QuantizeLayer):
        return layer.quantizer_vars
    if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
        if layer._output_quantizers:
            return layer._output_quantizer_vars
        for act in layer._quantize_activations:
            if getattr(act, "_post_activation_vars", None):
                return act._post_activation_vars
    return None
