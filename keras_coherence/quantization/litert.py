"""TFLite's integer requantization, reproduced in the Keras QAT graph.

A QAT model's fake-quant graph rounds each conv / depthwise / dense output once:
``round((acc + bias) * s_in * s_w / s_out)``. That is what a fixed-point accelerator with
a rounding shift computes, and what ``integer_weights`` is for. LiteRT does not: it
writes the multiplier ``M = s_in * s_w / s_out`` as a Q31 mantissa and a shift
(``QuantizeMultiplier``) and rounds twice (a rounding doubling high multiply, then a
rounding right shift). With power-of-two weight scales ``M`` is often just above a
power of two, the first rounding goes up for about every odd accumulator, and LiteRT's
output is one int8 step above the fake-quant value for a few percent of every layer's
outputs (``benchmarks/litert_rounding.py`` measures it: 100% of LiteRT's conv outputs
equal the double rounding).

``litert_rounding(model)`` is a context manager under which the Keras model's
*inference* computes TFLite's double rounding at each kernel's output quantizer, so
``model.predict`` reproduces what LiteRT will run; training is unchanged. It covers
kernels whose input comes from an activation quantizer (possibly through padding,
reshape or dropout) and whose output is quantized by the kernel's own activation
quantizer or by a single fused ReLU after it; other kernels keep single rounding and
are listed in the returned ``skipped``. Two-input ADD layers (residual connections) are
emulated too: TFLite rescales both inputs to a common scale with a 20-bit left shift
and requantizes the sum, with double rounding at each step.

``quantize_multiplier`` and ``requantize`` are the numpy versions (TFLite's
``QuantizeMultiplier`` and ``MultiplyByQuantizedMultiplier``).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import numpy as np

from keras_coherence._keras import keras, tf

__all__ = ["litert_rounding", "quantize_multiplier", "requantize"]


def quantize_multiplier(m):
    """TFLite's QuantizeMultiplier: ``m = q31 / 2**31 * 2**shift``, q31 in [2**30, 2**31)."""
    q, shift = np.frexp(np.asarray(m, np.float64))
    q31 = np.round(q * (1 << 31)).astype(np.int64)
    full = q31 == (1 << 31)
    return np.where(full, q31 // 2, q31), np.where(full, shift + 1, shift).astype(np.int64)


def requantize(acc, m):
    """TFLite's MultiplyByQuantizedMultiplier of int accumulators ``acc`` by ``m``
    (broadcast on the last axis): two roundings, as LiteRT computes."""
    q31, shift = quantize_multiplier(m)
    a = np.asarray(acc, np.int64) * (1 << np.maximum(shift, 0))
    ab = a * q31
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    v = np.trunc((ab + nudge) / float(1 << 31)).astype(np.int64)  # C++ division: toward zero
    right = np.maximum(-shift, 0)
    mask = (np.int64(1) << right) - 1
    threshold = (mask >> 1) + (v < 0)
    return (v >> right) + ((v & mask) > threshold)


def _requantize_tf(acc, m):
    """``requantize`` in TF ops (int64), ``m`` a float64 vector on the last axis."""
    q, shift = _frexp(m)
    q31 = tf.cast(tf.round(q * 2.0 ** 31), tf.int64)
    full = tf.equal(q31, 2 ** 31)
    q31 = tf.where(full, q31 // 2, q31)
    shift = tf.where(full, shift + 1, shift)
    a = acc * tf.bitwise.left_shift(tf.ones_like(shift), tf.maximum(shift, 0))
    ab = a * q31
    nudge = tf.where(ab >= 0, tf.constant(2 ** 30, tf.int64), tf.constant(1 - 2 ** 30, tf.int64))
    v = tf.truncatediv(ab + nudge, tf.constant(2 ** 31, tf.int64))
    right = tf.broadcast_to(tf.maximum(-shift, 0), tf.shape(v))
    mask = tf.bitwise.left_shift(tf.ones_like(right), right) - 1
    threshold = tf.bitwise.right_shift(mask, tf.ones_like(mask)) + tf.cast(v < 0, tf.int64)
    return tf.bitwise.right_shift(v, right) + tf.cast(tf.bitwise.bitwise_and(v, mask) > threshold, tf.int64)


def _frexp(m):
    """``(q, e)`` with ``m = q * 2**e``, q in [0.5, 1), for positive float64 ``m``."""
    e = tf.cast(tf.math.floor(tf.math.log(m) / np.log(2.0)), tf.int64) + 1
    q = m / tf.pow(tf.constant(2.0, tf.float64), tf.cast(e, tf.float64))
    # log rounding can be one off at exact powers of two
    e = tf.where(q >= 1.0, e + 1, tf.where(q < 0.5, e - 1, e))
    q = m / tf.pow(tf.constant(2.0, tf.float64), tf.cast(e, tf.float64))
    return q, e


def _nudged(min_var, max_var):
    """TF fake-quant's 8-bit (not narrow) scale and nudged zero point in [0, 255]."""
    lo, hi = tf.cast(min_var, tf.float32), tf.cast(max_var, tf.float32)
    scale = (hi - lo) / 255.0
    zp_from_min = -lo / scale
    zp = tf.where(zp_from_min < 0.0, 0.0, tf.where(zp_from_min > 255.0, 255.0,
                                                    tf.sign(zp_from_min) * tf.floor(tf.abs(zp_from_min) + 0.5)))
    return scale, zp


class _Requantizer:
    """Stands in for a tfmot activation quantizer: training as before; inference as
    LiteRT requantizes the producing kernel's int32 accumulator."""

    def __init__(self, inner, input_vars, exponent, relu_max=None):
        self.inner, self.input_vars, self.exponent = inner, input_vars, exponent
        self.relu_max = relu_max  # a fused ReLU6's cap: TFLite clamps at zp + round(6 / s_out)

    def __getattr__(self, name):  # build(), get_config() ... of the wrapped quantizer
        return getattr(self.inner, name)

    def __call__(self, inputs, training, weights, **kwargs):
        if training:
            return self.inner(inputs, training, weights, **kwargs)
        s_in, _ = _nudged(self.input_vars["min_var"], self.input_vars["max_var"])
        s_out, zp = _nudged(weights["min_var"], weights["max_var"])
        s_w = tf.pow(2.0, tf.reshape(tf.cast(self.exponent, tf.float32), [-1]))
        unit = tf.cast(s_in, tf.float64) * tf.cast(s_w, tf.float64)  # exact: s_w is a power of two
        acc = tf.cast(tf.round(tf.cast(inputs, tf.float64) / unit), tf.int64)  # accumulator + int bias
        m = unit / tf.cast(s_out, tf.float64)
        q = tf.clip_by_value(tf.cast(_requantize_tf(acc, m), tf.float32) + zp, 0.0, 255.0)
        if self.relu_max is not None:
            ratio = self.relu_max / s_out
            top = tf.minimum(255.0, zp + tf.sign(ratio) * tf.floor(tf.abs(ratio) + 0.5))
            # A capped input lost its accumulator; TFLite's clamp gives the cap's code.
            q = tf.where(inputs >= self.relu_max, top, tf.minimum(q, top))
        return (q - zp) * s_out


def _emulated_add(inputs, input_vars, output_vars):
    """TFLite's int8 ADD of two fake-quantized tensors: each input rescaled to
    ``2 * max(s1, s2) / 2**20`` units, summed, requantized (three double roundings)."""
    (s1, _), (s2, _) = (_nudged(v["min_var"], v["max_var"]) for v in input_vars)
    s_out, zp = _nudged(output_vars["min_var"], output_vars["max_var"])
    s1, s2, s_o = (tf.cast(v, tf.float64) for v in (s1, s2, s_out))
    twice_max = 2.0 * tf.maximum(s1, s2)
    shift = 2 ** 20  # TFLite's left_shift for int8 ADD
    scaled = [
        _requantize_tf(tf.cast(tf.round(tf.cast(x, tf.float64) / s), tf.int64) * shift,
                       tf.reshape(s / twice_max, [1]))
        for x, s in ((inputs[0], s1), (inputs[1], s2))
    ]
    out = _requantize_tf(scaled[0] + scaled[1], tf.reshape(twice_max / (shift * s_o), [1]))
    q = tf.clip_by_value(tf.cast(out, tf.float32) + zp, 0.0, 255.0)
    return (q - zp) * s_out


def _output_vars(layer):
    """The min/max variables of the quantizer that quantizes ``layer``'s output, or None."""
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer, quantize_wrapper

    if isinstance(layer, quantize_layer.QuantizeLayer):
        return layer.quantizer_vars
    if isinstance(layer, quantize_wrapper.QuantizeWrapper):
        if layer._output_quantizers:
            return layer._output_quantizer_vars
        for act in layer._quantize_activations:
            if getattr(act, "_post_activation_vars", None):
                return act._post_activation_vars
    return None


_PASS_THROUGH = (keras.layers.ZeroPadding2D, keras.layers.Reshape, keras.layers.Dropout, keras.layers.Flatten)


def _inner_layer(layer):
    return getattr(layer, "layer", layer)


def _producer_vars(layer):
    """Walk back from ``layer``'s input through pass-through layers to an output quantizer."""
    current = layer
    for _ in range(16):
        inbound = current.inbound_nodes[0].inbound_layers
        if isinstance(inbound, (list, tuple)):
            if len(inbound) != 1:
                return None
            inbound = inbound[0]
        found = _output_vars(inbound)
        if found is not None:
            return found
        if not isinstance(_inner_layer(inbound), _PASS_THROUGH):
            return None
        current = inbound
    return None


def _consumers(model, layer):
    return [other for other in model.layers
            if any(layer in (n.inbound_layers if isinstance(n.inbound_layers, (list, tuple)) else [n.inbound_layers])
                   for n in other.inbound_nodes)]


@contextlib.contextmanager
def litert_rounding(model):
    """Within the block, ``model``'s inference rounds like LiteRT (see the module doc).

    Yields a dict: ``patched`` (kernel layer names) and ``skipped`` (name: reason).
    The quantizers should be frozen (``to_tflite`` freezes them) so that the exponents
    are the exported ones.
    """
    from keras_coherence.quantization.qat import quantized_kernels

    restore: List = []
    report: Dict = {"patched": [], "skipped": {}}
    try:
        for k in quantized_kernels(model):
            wrapper, name = k.wrapper, k.name
            input_vars = _producer_vars(wrapper)
            if input_vars is None:
                report["skipped"][name] = "input not from an activation quantizer"
                continue
            if wrapper._quantize_activations and getattr(wrapper._quantize_activations[0], "_post_activation_vars",
                                                         None):
                act = wrapper._quantize_activations[0]
                restore.append((act, "quantizer", act.quantizer))
                act.quantizer = _Requantizer(act.quantizer, input_vars, k.state["exponent"])
            else:
                users = _consumers(model, wrapper)
                if len(users) != 1 or not getattr(users[0], "_output_quantizers", None):
                    report["skipped"][name] = "output not quantized by one fused activation"
                    continue
                user = users[0]
                cap = getattr(_inner_layer(user), "max_value", None)
                restore.append((user._output_quantizers, 0, user._output_quantizers[0]))
                user._output_quantizers[0] = _Requantizer(user._output_quantizers[0], input_vars,
                                                          k.state["exponent"],
                                                          None if cap is None else float(cap))
            report["patched"].append(name)
        for wrapper in model.layers:  # two-input ADDs whose inputs both come from quantizers
            inner = _inner_layer(wrapper)
            if type(inner) is not keras.layers.Add or _output_vars(wrapper) is None:
                continue
            inbound = wrapper.inbound_nodes[0].inbound_layers
            input_vars = [_output_vars(layer) for layer in (inbound if isinstance(inbound, (list, tuple)) else [])]
            if len(input_vars) != 2 or any(v is None for v in input_vars):
                report["skipped"][wrapper.name] = "ADD inputs not both from quantizers"
                continue
            restore.append((inner, "call", None))
            inner.call = (lambda inputs, _in=input_vars, _out=_output_vars(wrapper), **kwargs:
                          _emulated_add(inputs, _in, _out))
            report["patched"].append(wrapper.name)
        model.predict_function = None  # retrace with the patched quantizers
        yield report
    finally:
        for owner, key, original in reversed(restore):
            if original is None:  # an instance attribute shadowing the class's method
                delattr(owner, key)
            elif isinstance(key, str):
                setattr(owner, key, original)
            else:
                owner[key] = original
        model.predict_function = None
