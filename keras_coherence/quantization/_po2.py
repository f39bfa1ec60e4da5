"""Tensor math shared by the power-of-two (PO2) quantizers.

Every function here is stateless. Exponents are float32 tensors that hold integer
values; ``pow2`` turns them into exact powers of two, so ``x / pow2(e)`` and
``pow2(e) * codes`` are exact in float32 (for normal numbers).

Definitions (``qp = 2**(bits - 1) - 1``, narrow-range symmetric levels):

* ``codes(x, e) = clip(round_half_to_even(x / 2**e), -qp, qp)``
* ``Q(x) = 2**e * codes(x, e)``
* ``wmsqe(x, e, w) = sum(w * (x - Q(x))**2)`` over the axes that share one exponent.
"""
import math
import numbers

from keras_coherence._keras import tf

# Added before taking a logarithm (the QKeras / ``K.epsilon()`` convention). It puts
# a floor on every exponent found by a least-squares step: round(log2(1e-7)) = -23.
EPS = 1e-7
MIN_EXPONENT = -126  # smallest exponent of a normal float32
MAX_EXPONENT = 127
LN2 = math.log(2.0)


def check_bits(bits):
    """Returns ``bits`` as an int, or raises ``ValueError`` unless it is an int in 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 2..8 (codes are stored as int8), got {bits}")
    return int(bits)


def max_level(bits):
    """Largest integer code ``qp = 2**(bits - 1) - 1`` of a narrow-range signed quantizer."""
    return 2 ** (bits - 1) - 1


def pow2(e):
    """Exact ``2**e`` for integer-valued float ``e``, clipped to the normal float32 range."""
    e = tf.clip_by_value(tf.math.round(e), MIN_EXPONENT, MAX_EXPONENT)
    bits = tf.bitwise.left_shift(tf.cast(e, tf.int32) + 127, 23)
    return tf.bitcast(bits, tf.float32)


def log2(v):
    return tf.math.log(v) / LN2


def po2_exponent(v):
    """Nearest power-of-two exponent of a positive scale: ``round(log2(v + EPS))``."""
    return tf.math.round(log2(v + EPS))


def codes(x, e, qp):
    """Integer codes (as float32) of ``x`` on the grid ``2**e``."""
    return tf.clip_by_value(tf.math.round(x / pow2(e)), -qp, qp)


def fake_quantize(x, e, qp):
    """``Q(x)`` with no gradient trickery."""
    return pow2(e) * codes(x, e, qp)


def inside_mask(x, e, qp):
    """1.0 where ``round(x / 2**e)`` lies within ``[-qp, qp]`` (not clipped), else 0.0."""
    return tf.cast(tf.abs(tf.math.round(x / pow2(e))) <= qp, x.dtype)


def wmsqe(x, e, qp, axes, weight=None):
    """Weighted sum of squared quantization errors, one value per exponent."""
    err = tf.math.squared_difference(x, fake_quantize(x, e, qp))
    if weight is not None:
        err = err * weight
    return tf.reduce_sum(err, axis=axes, keepdims=True)


def least_squares_exponent(x, q, axes, weight=None):
    """PO2-rounded least-squares scale ``sum(w x q) / sum(w q q)`` for fixed codes ``q``.

    Channels whose codes are all zero give scale 0, i.e. the floor exponent -23.
    """
    wq = q if weight is None else weight * q
    num = tf.reduce_sum(wq * x, axis=axes, keepdims=True)
    den = tf.reduce_sum(wq * q, axis=axes, keepdims=True)
    return po2_exponent(tf.math.divide_no_nan(num, den))


def ste_quantize(x, e, qp):
    """``Q(x)`` in the forward pass; gradient 1 for unclipped elements, 0 for clipped ones.

    The exponent gets no gradient. The forward value is exactly ``2**e * codes``.
    """
    e = tf.stop_gradient(e)
    inside = tf.stop_gradient(inside_mask(x, e, qp))
    return tf.stop_gradient(fake_quantize(x, e, qp)) + inside * (x - tf.stop_gradient(x))
