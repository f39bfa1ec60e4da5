"""TFLite's integer requantization, reproduced in the Keras QAT graph.

A QAT model's fake-quant graph rounds each conv / depthwise / dense output once:
``round((acc + bias) * s_in * s_w / s_out)``. That is what a fixed-point accelerator with
a rounding shift computes, and what ``integer_weights`` is for. LiteRT does not: it
writes the multiplier ``M = s_in * s_w / s_out`` as a Q31 mantissa and a shift
(``QuantizeMultiplier``) and rounds twice: a rounding doubling high multiply, then a
rounding right shift. With power-of-two weight scales ``M`` is often just above a
power of two, the first rounding goes up for about every odd accumulator, and LiteRT's
output is one int8 step off the fake-quant value for a few percent of every layer's
outputs. How the kernels round differs, and ``benchmarks/litert_rounding.py`` measures
every op against each candidate (``requantize``'s ``rounding``):

* ``"optimized"``: LiteRT's builtin CPU kernels (``run_tflite``; the interpreter
  without its default XNNPACK delegate). CONV_2D, DEPTHWISE_CONV_2D and
  FULLY_CONNECTED round the shift's ties *up* (toward +inf, like ARM's ``SRSHL``);
  ADD and MEAN round them away from zero.
* ``"reference"``: ``OpResolverType.BUILTIN_REF``: ties away from zero for the conv
  ops, ADD and MEAN; FULLY_CONNECTED rounds once (``(acc * q31 + half) >> shift``).

Ties only matter for negative values, so networks whose every kernel feeds a ReLU
(MobileNetV1) barely notice; MobileNetV2's linear bottlenecks and residual ADDs do.

``litert_rounding(model)`` is a context manager under which the Keras model's
*inference* computes that integer arithmetic at each kernel's output quantizer, so
``model.predict`` reproduces what LiteRT will run; training is unchanged. It covers
kernels whose input comes from an activation quantizer (possibly through padding,
reshape or dropout) and whose output is quantized by the kernel's own activation
quantizer or by a single fused ReLU after it. Two-input ADD layers (residual
connections: both inputs rescaled to a common scale with a 20-bit left shift, the sum
requantized) and ``GlobalAveragePooling2D`` (TFLite's MEAN: an integer sum and a Q31
multiplier, in one of two ways depending on ``keepdims``) are emulated too. Anything else keeps the
fake-quant rounding and is listed in the returned ``skipped``.

``quantize_multiplier``, ``requantize`` and ``multiply_by_quantized_multiplier`` are
the numpy versions (TFLite's ``QuantizeMultiplier`` and
``MultiplyByQuantizedMultiplier``).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import numpy as np

from keras_coherence._internals import keras_graph
from keras_coherence._internals.tfmot_private import (
    QuantizeLayer, output_quantizers, output_range_vars, post_activation_quantizer,
)
from keras_coherence._keras import keras, tf

__all__ = ["litert_rounding", "quantize_multiplier", "requantize", "multiply_by_quantized_multiplier", "KERNELS",
           "ROUNDINGS"]

# How TFLite's MultiplyByQuantizedMultiplier rounds (see ``requantize``).
ROUNDINGS = ("double", "double_half_up", "single")
# kernels -> {kernel layout: rounding} of the requantization after CONV_2D,
# DEPTHWISE_CONV_2D and FULLY_CONNECTED, and how QUANTIZE (float input -> int8)
# rounds ``x / s``; ADD and MEAN use "double" in both (measured op by op:
# benchmarks/litert_rounding.py, tests/test_litert_rounding.py).
KERNELS = {
    "optimized": {"conv": "double_half_up", "depthwise": "double_half_up", "dense": "double_half_up",
                  "quantize": "half_even"},
    "reference": {"conv": "double", "depthwise": "double", "dense": "single", "quantize": "half_away"},
}


def quantize_multiplier(m):
    """TFLite's QuantizeMultiplier: ``m = q31 / 2**31 * 2**shift``, q31 in [2**30, 2**31)."""
    q, shift = np.frexp(np.asarray(m, np.float64))
    q31 = np.round(q * (1 << 31)).astype(np.int64)
    full = q31 == (1 << 31)
    return np.where(full, q31 // 2, q31), np.where(full, shift + 1, shift).astype(np.int64)


def _check_rounding(rounding):
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: expected one of {ROUNDINGS}")


def requantize(acc, m, rounding="double"):
    """TFLite's MultiplyByQuantizedMultiplier of int accumulators ``acc`` by ``m``
    (broadcast on the last axis), with ``m = q31 / 2**31 * 2**shift``
    (``quantize_multiplier``).

    ``rounding``:

    * ``"double"``: a rounding doubling high multiply by ``q31``, then a rounding
      right shift whose ties go away from zero (``RoundingDivideByPOT``; TFLite's
      reference kernels, ADD and MEAN);
    * ``"double_half_up"``: the same with the shift's ties going up (toward +inf), as
      LiteRT's optimized CPU conv, depthwise and fully-connected kernels round;
    * ``"single"``: ``(acc * q31 + half) >> (31 - shift)``, one rounding (TFLite's
      reference FULLY_CONNECTED).
    """
    q31, shift = quantize_multiplier(m)
    return multiply_by_quantized_multiplier(acc, q31, shift, rounding)


def multiply_by_quantized_multiplier(acc, q31, shift, rounding="double"):
    """``requantize`` from a given ``(q31, shift)``, which need not be normalized
    (TFLite's MEAN folds ``1 / count`` into ``q31``). Integer arithmetic throughout."""
    _check_rounding(rounding)
    acc, q31, shift = (np.asarray(v, np.int64) for v in (acc, q31, shift))
    if rounding == "single":
        total = 31 - shift
        return (acc * q31 + (np.int64(1) << (total - 1))) >> total
    t = acc * (np.int64(1) << np.maximum(shift, 0)) * q31
    t = t + np.where(t >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    v = np.where(t >= 0, t >> 31, -((-t) >> 31))  # C++ division: toward zero
    right = np.maximum(-shift, 0)
    if rounding == "double_half_up":
        return (v + ((np.int64(1) << right) >> 1)) >> right
    mask = (np.int64(1) << right) - 1
    threshold = (mask >> 1) + (v < 0)
    return (v >> right) + ((v & mask) > threshold)


def _requantize_tf(acc, m, rounding="double"):
    """``requantize`` in TF ops (int64), ``m`` a float64 vector on the last axis."""
    q31, shift = _quantize_multiplier_tf(m)
    return _multiply_by_quantized_multiplier_tf(acc, q31, shift, rounding)


def _quantize_multiplier_tf(m):
    q, shift = _frexp(m)
    q31 = tf.cast(tf.round(q * 2.0 ** 31), tf.int64)
    full = tf.equal(q31, 2 ** 31)
    return tf.where(full, q31 // 2, q31), tf.where(full, shift + 1, shift)


def _multiply_by_quantized_multiplier_tf(acc, q31, shift, rounding):
    """TFLite's MultiplyByQuantizedMultiplier(acc, q31, shift) in int64 TF ops; ``q31``
    need not be normalized (MEAN folds ``1 / count`` into it)."""
    _check_rounding(rounding)
    if rounding == "single":
        total = tf.broadcast_to(31 - shift, tf.shape(acc))
        half = tf.bitwise.left_shift(tf.ones_like(total), total - 1)
        return tf.bitwise.right_shift(acc * q31 + half, total)
    a = acc * tf.bitwise.left_shift(tf.ones_like(shift), tf.maximum(shift, 0))
    ab = a * q31
    nudge = tf.where(ab >= 0, tf.constant(2 ** 30, tf.int64), tf.constant(1 - 2 ** 30, tf.int64))
    v = tf.truncatediv(ab + nudge, tf.constant(2 ** 31, tf.int64))
    right = tf.broadcast_to(tf.maximum(-shift, 0), tf.shape(v))
    if rounding == "double_half_up":
        half = tf.bitwise.right_shift(tf.bitwise.left_shift(tf.ones_like(right), right), tf.ones_like(right))
        return tf.bitwise.right_shift(v + half, right)
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
    """The exported 8-bit scale and TF fake-quant's nudged zero point in [0, 255].

    The converter divides the range in float64 and stores float32; fake-quant's own
    float32 division is one ulp off for about one tensor in ten, enough to move a Q31
    multiplier."""
    lo, hi = tf.cast(min_var, tf.float32), tf.cast(max_var, tf.float32)
    scale = tf.cast((tf.cast(hi, tf.float64) - tf.cast(lo, tf.float64)) / 255.0, tf.float32)
    zp_from_min = -lo / scale
    zp = tf.clip_by_value(_round_half_away(zp_from_min), 0.0, 255.0)
    return scale, zp


def _round_half_away(v):
    """C's ``round``: ties away from zero (``tf.round`` breaks them to even)."""
    return tf.sign(v) * tf.floor(tf.abs(v) + 0.5)


def _dequantized(codes, zp, scale):
    """uint8 codes (any float or int dtype), clamped to [0, 255], as real values."""
    return (tf.clip_by_value(tf.cast(codes, tf.float32), 0.0, 255.0) - zp) * scale


class _StandIn:
    """Stands in for a tfmot quantizer: training calls it unchanged, inference calls
    ``infer(inputs, weights)``; every other attribute is the wrapped quantizer's."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # build(), get_config() ... of the wrapped quantizer
        return getattr(self.inner, name)

    def __call__(self, inputs, training, weights, **kwargs):
        if training:
            return self.inner(inputs, training, weights, **kwargs)
        return self.infer(inputs, weights)


class _Requantizer(_StandIn):
    """A kernel's output quantizer: inference as LiteRT requantizes the kernel's int32
    accumulator."""

    def __init__(self, inner, input_vars, kernel, rounding, relu=False, relu_max=None, bias_input_vars=None):
        super().__init__(inner)
        self.input_vars, self.kernel, self.rounding = input_vars, kernel, rounding
        # The converter quantizes the bias before it drops an identity MEAN in front of
        # the kernel: with the dropped tensor's scale, not the input's.
        self.bias_input_vars = bias_input_vars or input_vars
        self.relu = relu  # a fused ReLU: TFLite clamps at the zero point
        self.relu_max = relu_max  # a fused ReLU6's cap: TFLite clamps at zp + round(6 / s_out)

    def infer(self, inputs, weights):
        s_in, _ = _nudged(self.input_vars["min_var"], self.input_vars["max_var"])
        s_out, zp = _nudged(weights["min_var"], weights["max_var"])
        s_w = tf.pow(2.0, tf.reshape(tf.cast(self.kernel.state["exponent"], tf.float32), [-1]))
        unit = tf.cast(s_in, tf.float64) * tf.cast(s_w, tf.float64)  # exact: s_w is a power of two
        bias = self.kernel.bias()
        if bias is None:
            acc = tf.cast(tf.round(tf.cast(inputs, tf.float64) / unit), tf.int64)
        else:
            # The bias apart: the converter rounds bias / unit on its own, and a bias near
            # a half unit would otherwise round with the float32 sum's noise.
            bias = tf.cast(bias, tf.float32)
            s_bias, _ = _nudged(self.bias_input_vars["min_var"], self.bias_input_vars["max_var"])
            bias_unit = tf.cast(s_bias, tf.float64) * tf.cast(s_w, tf.float64)
            acc = (tf.cast(tf.round(tf.cast(inputs - bias, tf.float64) / unit), tf.int64)
                   + tf.cast(tf.round(tf.cast(bias, tf.float64) / bias_unit), tf.int64))
        m = unit / tf.cast(s_out, tf.float64)
        q = tf.clip_by_value(tf.cast(_requantize_tf(acc, m, self.rounding), tf.float32) + zp, 0.0, 255.0)
        if self.relu:  # a clipped input lost its accumulator; TFLite's clamp gives zp
            q = tf.where(inputs <= 0.0, zp, tf.maximum(q, zp))
        if self.relu_max is not None:
            top = tf.minimum(255.0, zp + _round_half_away(self.relu_max / s_out))
            q = tf.where(inputs >= self.relu_max, top, tf.minimum(q, top))
        return _dequantized(q, zp, s_out)


class _Quantize(_StandIn):
    """The input's QuantizeLayer quantizer: inference rounds ``x / s`` as TFLite's
    QUANTIZE op does (half to even in the optimized kernels, half away from zero in
    the reference ones)."""

    def __init__(self, inner, half_even):
        super().__init__(inner)
        self.half_even = half_even

    def infer(self, inputs, weights):
        s, zp = _nudged(weights["min_var"], weights["max_var"])
        v = tf.cast(inputs, tf.float32) / s
        return _dequantized((tf.math.round(v) if self.half_even else _round_half_away(v)) + zp, zp, s)


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
    return _dequantized(tf.cast(out, tf.float32) + zp, zp, s_out)


def _emulated_mean(inputs, input_vars, output_vars, keepdims, kernels):
    """TFLite's int8 MEAN over height and width.

    Two kernels: with ``keep_dims=False`` (and in the reference kernels always) the
    integer sum of the input codes times ``s_in / s_out`` as a Q31 multiplier into which
    ``1 / count`` is folded (``2**k / count`` in the mantissa, ``k = floor(log2
    count)`` taken off the shift). The optimized ``keep_dims=True`` kernel instead sums
    the raw int8 values, requantizes by ``s_in / (count * s_out)`` (computed in
    float32) and subtracts the input zero point as ``round(zp_in * s_in / s_out)``."""
    count = int(inputs.shape[1]) * int(inputs.shape[2])
    s_in, zp_in = _nudged(input_vars["min_var"], input_vars["max_var"])
    s_out, zp = _nudged(output_vars["min_var"], output_vars["max_var"])
    codes = tf.cast(tf.round(tf.cast(inputs, tf.float64) / tf.cast(s_in, tf.float64)), tf.int64)
    total = tf.reduce_sum(codes, axis=[1, 2], keepdims=keepdims)
    if keepdims and kernels == "optimized":
        zp_in8, zp_out8 = zp_in - 128.0, zp - 128.0  # int8 zero points
        raw = total + tf.cast(zp_in8, tf.int64) * count
        q31, shift = _quantize_multiplier_tf(tf.reshape(tf.cast(s_in / (float(count) * s_out), tf.float64), [1]))
        offset = zp_out8 - _round_half_away(zp_in8 * s_in / s_out)
        out = _multiply_by_quantized_multiplier_tf(raw, q31, shift, "double") + tf.cast(offset, tf.int64) + 128
        return _dequantized(out, zp, s_out)
    q31, shift = _quantize_multiplier_tf(tf.reshape(tf.cast(s_in, tf.float64) / tf.cast(s_out, tf.float64), [1]))
    k = tf.minimum(tf.minimum(tf.constant(count.bit_length() - 1, tf.int64), 32), 31 + shift)
    q31 = tf.bitwise.left_shift(q31, k) // count
    out = _multiply_by_quantized_multiplier_tf(total, q31, shift - k, "double")
    return _dequantized(tf.cast(out, tf.float32) + zp, zp, s_out)


_PASS_THROUGH = (keras.layers.ZeroPadding2D, keras.layers.Reshape, keras.layers.Dropout, keras.layers.Flatten)


def _inner_layer(layer):
    return getattr(layer, "layer", layer)


def _producer_vars(layer, elided=()):
    """Walk back from ``layer``'s input through pass-through layers (and layers the
    converter removes, ``elided``) to an output quantizer."""
    current = layer
    for _ in range(16):
        inbound = keras_graph.inbound_layers(current)
        if len(inbound) != 1:
            return None
        inbound = inbound[0]
        found = None if inbound in elided else output_range_vars(inbound)
        if found is not None:
            return found
        if not isinstance(_inner_layer(inbound), _PASS_THROUGH) and inbound not in elided:
            return None
        current = inbound
    return None


def _identity_mean(layer):
    """A keepdims global average pooling over a 1x1 map: the converter drops the
    MEAN, and with it the requantization to the pooling's own output range."""
    inner = _inner_layer(layer)
    return (type(inner) is keras.layers.GlobalAveragePooling2D and inner.keepdims
            and inner.data_format == "channels_last" and inner.input_shape[1:3] == (1, 1))


def _bypass_output_quantizer(wrapper, restore):
    """At inference, ``wrapper``'s output quantizer passes values through: the layer
    already computes LiteRT's int8 output, or the converter removes the layer. TF's
    fake-quant can nudge the zero point one code off the converter's."""
    quantizers = output_quantizers(wrapper)
    restore.append((quantizers, 0, quantizers[0]))
    quantizers[0] = _Identity(quantizers[0])


class _Identity(_StandIn):
    """An output quantizer bypassed at inference (``_bypass_output_quantizer``)."""

    def infer(self, inputs, weights):
        return inputs


@contextlib.contextmanager
def litert_rounding(model, kernels="optimized"):
    """Within the block, ``model``'s inference rounds like LiteRT (see the module doc).

    Args:
        model: a QAT model from ``quantize_model``.
        kernels: ``"optimized"`` (LiteRT's builtin CPU kernels, what ``run_tflite``
            runs) or ``"reference"`` (``OpResolverType.BUILTIN_REF``).

    Yields a dict: ``patched`` (layer names) and ``skipped`` (name: reason).
    The quantizers should be frozen (``to_integer_tflite`` freezes them) so that the exponents
    are the exported ones.

    Example::

        tflite_model = to_integer_tflite(qat_model)
        with litert_rounding(qat_model):
            logits = qat_model.predict(x)   # == run_tflite(tflite_model, x)
    """
    from keras_coherence.quantization.qat import _fused_relu, quantized_kernels

    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: expected one of {sorted(KERNELS)}")
    rounding = KERNELS[kernels]
    restore: List = []
    report: Dict = {"patched": [], "skipped": {}}
    elided = {layer for layer in model.layers if _identity_mean(layer) and output_quantizers(layer)}
    consumers = keras_graph.consumer_layers(model)
    try:
        for layer in elided:
            _bypass_output_quantizer(layer, restore)
            report["patched"].append(layer.name)
        for layer in model.layers:  # float inputs: TFLite's QUANTIZE
            if isinstance(layer, QuantizeLayer) and layer.quantizer is not None:
                restore.append((layer, "quantizer", layer.quantizer))
                layer.quantizer = _Quantize(layer.quantizer, rounding["quantize"] == "half_even")
                report["patched"].append(layer.name)
        for k in quantized_kernels(model):
            wrapper, name = k.wrapper, k.name
            input_vars, bias_input_vars = _producer_vars(wrapper, elided), _producer_vars(wrapper)
            if input_vars is None:
                report["skipped"][name] = "input not from an activation quantizer"
                continue
            act = post_activation_quantizer(wrapper)
            if act is not None:
                restore.append((act, "quantizer", act.quantizer))
                act.quantizer = _Requantizer(act.quantizer, input_vars, k, rounding[k.quantizer.layout],
                                             bias_input_vars=bias_input_vars)
            else:
                users = consumers[wrapper.name][0]
                user = users[0] if len(users) == 1 else None
                if user is None or not output_quantizers(user) or not _fused_relu(_inner_layer(user)):
                    report["skipped"][name] = "output not quantized by one fused ReLU"
                    continue
                inner = _inner_layer(user)
                cap = getattr(inner, "max_value", None)
                if getattr(getattr(inner, "activation", None), "__name__", None) == "relu6":
                    cap = 6.0
                quantizers = output_quantizers(user)
                restore.append((quantizers, 0, quantizers[0]))
                quantizers[0] = _Requantizer(quantizers[0], input_vars, k, rounding[k.quantizer.layout], relu=True,
                                             relu_max=None if cap is None else float(cap),
                                             bias_input_vars=bias_input_vars)
            report["patched"].append(name)
        for wrapper in model.layers:  # two-input ADDs whose inputs both come from quantizers
            inner = _inner_layer(wrapper)
            if type(inner) is not keras.layers.Add or output_range_vars(wrapper) is None:
                continue
            input_vars = [output_range_vars(layer) for layer in keras_graph.inbound_layers(wrapper)]
            if len(input_vars) != 2 or any(v is None for v in input_vars):
                report["skipped"][wrapper.name] = "ADD inputs not both from quantizers"
                continue
            restore.append((inner, "call", None))
            inner.call = (lambda inputs, _in=input_vars, _out=output_range_vars(wrapper), **kwargs:
                          _emulated_add(inputs, _in, _out))
            _bypass_output_quantizer(wrapper, restore)
            report["patched"].append(wrapper.name)
        for wrapper in model.layers:  # global average pooling: TFLite's MEAN
            inner = _inner_layer(wrapper)
            if (type(inner) is not keras.layers.GlobalAveragePooling2D or output_range_vars(wrapper) is None
                    or wrapper in elided):
                continue
            input_vars = _producer_vars(wrapper, elided)
            static = inner.input_shape[1] is not None and inner.input_shape[2] is not None
            if input_vars is None or inner.data_format != "channels_last" or not static:
                report["skipped"][wrapper.name] = ("MEAN emulated only for channels_last, a static spatial shape and "
                                                   "a quantized input")
                continue
            restore.append((inner, "call", None))
            inner.call = (lambda inputs, _in=input_vars, _out=output_range_vars(wrapper), _keep=bool(inner.keepdims),
                          **kwargs: _emulated_mean(inputs, _in, _out, _keep, kernels))
            _bypass_output_quantizer(wrapper, restore)
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
