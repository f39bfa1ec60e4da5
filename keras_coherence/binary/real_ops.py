"""Hand-written backward passes of the *real* (non-binary) layers of a binary network.

The standard baseline of the on-device training export and the real parts of
ResNetE-18 (the 7x7 stem convolution, the 1x1 shortcut convolution, batch norm on
images, ReLU, max and average pooling) need gradients that TensorFlow's autodiff
computes with ops that have no TFLite builtin (``Conv2DBackpropFilter``,
``FusedBatchNormGradV3``, ``ReluGrad``, ``MaxPoolGrad``, ``AvgPoolGrad``). Every op here
is a ``tf.custom_gradient`` whose forward is the plain TF op and whose backward is built
only from ops that the TFLite converter lowers to builtins (``CONV_2D``,
``TRANSPOSE_CONV``, ``TRANSPOSE``, ``RESHAPE``, ``PAD``, ``STRIDED_SLICE``,
``CONCATENATION``, ``SELECT_V2``, comparisons, ``MEAN``/``SUM``, ``MUL``/``ADD``/``SUB``,
``RSQRT``), so that a Keras model made of the layers of
:mod:`keras_coherence.binary.layers` traces into a TFLite training signature that runs in
the plain LiteRT interpreter.

Each backward keeps what the standard (autodiff) backward keeps, in float32, except
ReLU, which keeps a ``bool`` mask instead of its float output:

* :func:`conv2d` -- the float input and the kernel (input and kernel gradients through
  :func:`~keras_coherence.binary.ops.conv_input_grad` and
  :func:`~keras_coherence.binary.ops.conv_filter_grad`);
* :func:`batch_norm` -- ``x_hat`` and ``1/sigma`` per channel;
* :func:`relu` -- the mask ``x > 0``;
* :func:`max_pool2d` -- the float input and the output (as ``MaxPoolGrad``);
* :func:`avg_pool2d` -- nothing (the window sizes are constants).

Pools take any window size, strides and ``"VALID"``/``"SAME"`` padding (overlapping
windows included); every op is NHWC with static height, width and channels.

The ops have no tensor-dependent Python control flow, so they are excluded from
AutoGraph (``do_not_convert``): inside a ``tf.function`` they trace as written.
"""
from __future__ import annotations

import numpy as np

from keras_coherence._keras import tf
from keras_coherence.binary import ops

__all__ = ["conv2d", "batch_norm", "relu", "max_pool2d", "avg_pool2d", "pool_geometry"]

_plain = tf.autograph.experimental.do_not_convert


def _pair(value, name):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer or a pair of them.")
    return pair


def _padding(padding):
    if not isinstance(padding, str) or padding.upper() not in ("VALID", "SAME"):
        raise ValueError(f"padding={padding!r} must be 'valid' or 'same'.")
    return padding.upper()


def _static_nhwc(x, what):
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 4 or None in x.shape.as_list()[1:]:
        raise ValueError(f"{what} needs NHWC inputs with static height, width and channels; "
                         f"got shape {x.shape}.")
    return x


# --------------------------------------------------------------------------------------
# Convolution with a float kernel
# --------------------------------------------------------------------------------------


@_plain
def conv2d(x, kernel, strides=(1, 1), padding="VALID", dilations=(1, 1)):
    """``tf.nn.convolution(x, kernel, strides, padding, dilations)`` (NHWC, HWIO kernel)
    with a builtin-only backward.

    Backward with output gradient ``dz``: ``dx = conv_input_grad(dz, kernel, ...)`` and
    ``dW = conv_filter_grad(x, dz, ...)`` of :mod:`keras_coherence.binary.ops` (a
    ``TRANSPOSE_CONV`` or ``CONV_2D``, and a ``CONV_2D`` over the batch axis: a TFLite
    training model needs a fixed batch size). It keeps the float input, as autodiff's
    ``Conv2DBackpropFilter`` does. ``dilations > 1`` needs ``strides == 1``. Traced
    inside :class:`keras_coherence.binary.ops.scratch_budget` with a static batch, the
    convolutions split the batch as the binary ones do (same arithmetic; the kernel
    gradient sums over the chunks).

    >>> x, w = tf.ones((1, 4, 4, 1)), tf.ones((3, 3, 1, 2))
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(w)
    ...     y = conv2d(x, w, padding="same")
    >>> y.shape, float(tape.gradient(y, w)[1, 1, 0, 0])
    (TensorShape([1, 4, 4, 2]), 16.0)
    """
    strides = _pair(strides, "strides")
    dilations = _pair(dilations, "dilations")
    padding = _padding(padding)
    if strides != (1, 1) and dilations != (1, 1):
        raise ValueError(f"strides={strides} with dilations={dilations}: a convolution takes "
                         "strides > 1 or dilations > 1, not both (as Keras's Conv2D).")
    x = _static_nhwc(x, "conv2d")
    kernel = tf.convert_to_tensor(kernel)
    x_shape = x.shape
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    # for the batch split of ops.scratch_budget (a device training export sets one)
    forward_scratch, backward_scratch = ops.conv_scratch_bytes(x_shape, kernel.shape, strides)

    def conv(inputs, filters):
        return tf.nn.convolution(inputs, filters, strides=list(strides), padding=padding,
                                 dilations=list(dilations))

    @tf.custom_gradient
    def _op(x, w):
        parts = [conv(ops.take(x, c), w) for c in ops.batch_chunks(x.shape[0], forward_scratch)]
        z = parts[0] if len(parts) == 1 else tf.concat(parts, 0)

        def grad(dz):
            dxs, dw = [], None
            for chunk in ops.batch_chunks(dz.shape[0], backward_scratch):
                dz_part = ops.take(dz, chunk)
                dxs.append(ops.conv_input_grad(dz_part, w, x_shape, strides, padding, dilations))
                part = ops.conv_filter_grad(ops.take(x, chunk), dz_part, (kh, kw), strides, padding,
                                            dilations)
                dw = part if dw is None else dw + part
            return (dxs[0] if len(dxs) == 1 else tf.concat(dxs, 0)), dw

        return z, grad

    return _op(x, kernel)


# --------------------------------------------------------------------------------------
# Standard batch norm (training mode)
# --------------------------------------------------------------------------------------


@_plain
def batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-3):
    """Training-mode batch norm ``gamma * (x - mean) / sqrt(variance + epsilon) + beta``
    over the last axis, with the standard backward written out.

    ``mean`` and ``variance`` are the batch's per-channel mean and (biased) variance of
    ``x``, computed by the caller without gradient; the backward accounts for them. It
    keeps ``x_hat = (x - mean) / sigma`` (float32) and ``1 / sigma`` per channel, and with
    means over every axis but the last:

    ``dx = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))``,
    ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)``.

    ``gamma`` / ``beta`` may be None (Keras's ``scale=False`` / ``center=False``).

    >>> x = tf.constant([[0.0], [2.0]])
    >>> batch_norm(x, tf.constant([1.0]), tf.constant([1.0]), epsilon=0.0).numpy().ravel().tolist()
    [-1.0, 1.0]
    """
    x = tf.convert_to_tensor(x)
    if x.shape.rank is None or x.shape.rank < 2:
        raise ValueError(f"batch_norm needs inputs of rank >= 2; got shape {x.shape}.")
    axes = list(range(x.shape.rank - 1))
    channels = x.shape[-1]
    has_gamma, has_beta = gamma is not None, beta is not None
    gamma = tf.convert_to_tensor(gamma) if has_gamma else tf.ones([channels], x.dtype)
    beta = tf.convert_to_tensor(beta) if has_beta else tf.zeros([channels], x.dtype)

    @tf.custom_gradient
    def _op(x, mean, variance, gamma, beta):
        inv_sigma = tf.math.rsqrt(variance + epsilon)
        x_hat = (x - mean) * inv_sigma
        y = x_hat * gamma + beta

        def grad(dy):
            mean_dy = tf.reduce_mean(dy, axis=axes)
            mean_dy_xhat = tf.reduce_mean(dy * x_hat, axis=axes)
            dx = (gamma * inv_sigma) * (dy - mean_dy - x_hat * mean_dy_xhat)
            dgamma = tf.reduce_sum(dy * x_hat, axis=axes)
            dbeta = tf.reduce_sum(dy, axis=axes)
            return dx, tf.zeros_like(mean), tf.zeros_like(variance), dgamma, dbeta

        return y, grad

    return _op(x, tf.stop_gradient(mean), tf.stop_gradient(variance), gamma, beta)


# --------------------------------------------------------------------------------------
# ReLU
# --------------------------------------------------------------------------------------


@_plain
def relu(x):
    """``tf.nn.relu(x)`` whose backward keeps the ``bool`` mask ``x > 0`` (autodiff's
    ``ReluGrad`` keeps the float output and has no TFLite builtin): ``dx = dy * mask``.
    At ``x == 0`` the gradient is 0, as ``ReluGrad``'s.

    >>> x = tf.constant([-1.0, 0.0, 2.0])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = relu(x)
    >>> y.numpy().tolist(), tape.gradient(y, x).numpy().tolist()
    ([0.0, 0.0, 2.0], [0.0, 0.0, 1.0])
    """
    x = tf.convert_to_tensor(x)

    @tf.custom_gradient
    def _op(x):
        mask = x > 0.0

        def grad(dy):
            return tf.where(mask, dy, tf.zeros_like(dy))

        return tf.nn.relu(x), grad

    return _op(x)


# --------------------------------------------------------------------------------------
# Pools: any window, strides and padding
# --------------------------------------------------------------------------------------


def pool_geometry(size, pool, stride, padding):
    """``(output size, pad before, pad after)`` of a pool along one axis, as TensorFlow
    computes them (``"SAME"``: ``ceil(size / stride)`` outputs, the odd padding row
    after; ``"VALID"``: trailing rows that fill no window get ``pad after < 0``)."""
    if padding == "SAME":
        out = -(-size // stride)
        before, after = ops.same_padding(size, pool, stride)
        return out, before, after
    if size < pool:
        raise ValueError(f"a 'valid' pool of {pool} needs at least {pool} rows/columns; got {size}.")
    out = (size - pool) // stride + 1
    return out, 0, (out - 1) * stride + pool - size


def _to_channel_batch(t, height, width):
    """``[N, H, W, C]`` → ``[N*C, H, W, 1]``: each channel as its own image."""
    return tf.reshape(tf.transpose(t, [0, 3, 1, 2]), [-1, height, width, 1])


def _from_channel_batch(t, height, width, channels):
    """``[N*C, H, W, 1]`` → ``[N, H, W, C]``."""
    return tf.transpose(tf.reshape(t, [-1, channels, height, width]), [0, 2, 3, 1])


def _pool_args(x, pool_size, strides, padding, what):
    x = _static_nhwc(x, what)
    pool = _pair(pool_size, "pool_size")
    strides = pool if strides is None else _pair(strides, "strides")
    padding = _padding(padding)
    _, h, w, c = (int(d) if d is not None else None for d in x.shape)
    gh = pool_geometry(h, pool[0], strides[0], padding)
    gw = pool_geometry(w, pool[1], strides[1], padding)
    return x, pool, strides, padding, (h, w, c), (gh, gw)


def _scatter(parts, pool, strides, padded_hw, dtype):
    """``parts`` ``[N*C, Ho, Wo, kh*kw]`` (one plane per window position, row-major) added
    back into ``[N*C, Hp, Wp, 1]`` at row ``stride*o + i``: one ``TRANSPOSE_CONV`` with a
    one-hot kernel (overlapping windows add up)."""
    kh, kw = pool
    onehot = np.zeros((kh, kw, 1, kh * kw), np.float32)
    for i in range(kh):
        for j in range(kw):
            onehot[i, j, 0, i * kw + j] = 1.0
    out_shape = tf.stack([tf.shape(parts)[0], padded_hw[0], padded_hw[1], 1])
    return tf.nn.conv2d_transpose(parts, tf.constant(onehot, dtype), out_shape,
                                  strides=list(strides), padding="VALID")


@_plain
def max_pool2d(x, pool_size, strides=None, padding="VALID"):
    """``tf.nn.max_pool2d(x, pool_size, strides, padding)`` (NHWC; ``strides`` defaults to
    ``pool_size``) with a builtin-only backward that keeps what ``MaxPoolGrad`` keeps:
    the float32 input and the output.

    Backward: each output's gradient goes to the *first* element (row-major within its
    window) equal to the window's maximum -- the element TF's ``MaxPoolGrad`` picks on
    ties; where windows overlap, an element collects the gradients of every window it is
    the maximum of. The windows are read with one strided slice per window position,
    and the gradients are added back with one ``TRANSPOSE_CONV``. ``"SAME"`` pads with
    the dtype's lowest value (never a window's first maximum unless the input holds it).

    >>> x = tf.constant([[1.0, 3.0, 3.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])[None, :, :, None]
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = max_pool2d(x, 2, strides=1)
    >>> y.numpy().ravel().tolist()
    [3.0, 3.0, 5.0, 2.0]
    >>> tape.gradient(y, x).numpy()[0, :, :, 0].tolist()
    [[0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """
    x, pool, strides, padding, (h, w, c), (gh, gw) = _pool_args(
        x, pool_size, strides, padding, "max_pool2d")
    (ho, top, bottom), (wo, left, right) = gh, gw
    kh, kw = pool
    padded = (h + top + bottom, w + left + right)

    @tf.custom_gradient
    def _op(x):
        y = tf.nn.max_pool2d(x, list(pool), list(strides), padding)

        def grad(dy):
            xb = ops.pad_or_crop_hw(_to_channel_batch(x, h, w), ((top, bottom), (left, right)),
                                 x.dtype.min)
            yb = _to_channel_batch(y, ho, wo)
            gb = _to_channel_batch(dy, ho, wo)
            zero = tf.zeros_like(gb)
            taken = None
            parts = []
            for i in range(kh):
                for j in range(kw):
                    window = xb[:, i:i + strides[0] * (ho - 1) + 1:strides[0],
                                j:j + strides[1] * (wo - 1) + 1:strides[1], :]
                    hit = tf.equal(window, yb)
                    if taken is not None:
                        hit = tf.logical_and(hit, tf.logical_not(taken))
                    taken = hit if taken is None else tf.logical_or(taken, hit)
                    parts.append(tf.where(hit, gb, zero))
            dxb = _scatter(tf.concat(parts, axis=3), pool, strides, padded, dy.dtype)
            dxb = ops.pad_or_crop_hw(dxb, ((-top, -bottom), (-left, -right)))
            return _from_channel_batch(dxb, h, w, c)

        return y, grad

    return _op(x)


@_plain
def avg_pool2d(x, pool_size, strides=None, padding="VALID"):
    """``tf.nn.avg_pool2d(x, pool_size, strides, padding)`` (NHWC; ``strides`` defaults
    to ``pool_size``) with a builtin-only backward (autodiff's ``AvgPoolGrad`` has no
    TFLite builtin) that keeps nothing of ``x``.

    Backward: each output's gradient divided by its window's element count (``"SAME"``
    windows at the border count only the elements inside the input, as TF's average
    pool does) and added back to every element of the window with one
    ``TRANSPOSE_CONV``.

    >>> x = tf.ones((1, 3, 3, 1))
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = avg_pool2d(x, 2, padding="same")
    >>> tape.gradient(y, x).numpy()[0, :, :, 0].tolist()
    [[0.25, 0.25, 0.5], [0.25, 0.25, 0.5], [0.5, 0.5, 1.0]]
    """
    x, pool, strides, padding, (h, w, c), (gh, gw) = _pool_args(
        x, pool_size, strides, padding, "avg_pool2d")
    (ho, top, bottom), (wo, left, right) = gh, gw
    padded = (h + top + bottom, w + left + right)

    def counts(size, out, before, k, s):
        starts = np.arange(out) * s - before
        return np.minimum(starts + k, size) - np.maximum(starts, 0)

    inverse = 1.0 / np.outer(counts(h, ho, top, pool[0], strides[0]),
                             counts(w, wo, left, pool[1], strides[1]))

    @tf.custom_gradient
    def _op(x):
        y = tf.nn.avg_pool2d(x, list(pool), list(strides), padding)

        def grad(dy):
            gb = _to_channel_batch(dy, ho, wo) * tf.constant(
                inverse.reshape(1, ho, wo, 1), dy.dtype)
            ones = tf.ones([pool[0], pool[1], 1, 1], dy.dtype)
            out_shape = tf.stack([tf.shape(gb)[0], padded[0], padded[1], 1])
            dxb = tf.nn.conv2d_transpose(gb, ones, out_shape, strides=list(strides),
                                         padding="VALID")
            dxb = ops.pad_or_crop_hw(dxb, ((-top, -bottom), (-left, -right)))
            return _from_channel_batch(dxb, h, w, c)

        return y, grad

    return _op(x)
