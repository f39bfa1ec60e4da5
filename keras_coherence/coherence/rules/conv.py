"""Convolutions: per-example kernel gradients from input patches.

The per-example kernel gradient of a convolution is ``patches_i^T dz_i``. For each
kernel offset the rule multiplies a strided slice of the (explicitly padded) input
with ``dz`` in one batched matmul (much cheaper than ``tf.image.extract_patches``),
and takes the batch sum of those per-example gradients as the kernel gradient -- so
the usual filter backprop is not paid for twice.
"""
from keras_coherence._internals.tf_private import onednn_enabled
from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import (
    LayerGrads, LayerRule, NotSupported, Trace, apply_activation, reduce_sq, register,
    var_key,
)
from keras_coherence.coherence.rules import _quantized

# larq's layers by name: larq loads only when a model has one (registry.rule_for)
_CONV = [keras.layers.Conv1D, keras.layers.Conv2D, "larq.layers.QuantConv1D", "larq.layers.QuantConv2D"]
_DEPTHWISE = [keras.layers.DepthwiseConv2D, "larq.layers.QuantDepthwiseConv2D"]


def _same_pads(size, kernel, stride, dilation):
    """TensorFlow's SAME padding (before, after) for one spatial axis."""
    out = (size + stride - 1) // stride
    total = tf.maximum((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_input(layer, x, kernel_size, strides, dilations):
    """Explicitly pad a ``[B, H, W, C]`` input so that a VALID convolution reproduces
    the layer's padding (``same``, ``causal`` for Conv1D, larq ``pad_values``)."""
    padding = layer.padding
    if padding == "valid":
        return x
    if padding == "causal":  # Conv1D only, in the 2-D view the W axis
        return tf.pad(x, [[0, 0], [0, 0], [(kernel_size[1] - 1) * dilations[1], 0], [0, 0]])
    shape = tf.shape(x)
    pads = [[0, 0]]
    for axis in range(2):
        size = x.shape[axis + 1] if x.shape[axis + 1] is not None else shape[axis + 1]
        pads.append(list(_same_pads(size, kernel_size[axis], strides[axis], dilations[axis])))
    pads.append([0, 0])
    return tf.pad(x, pads, constant_values=getattr(layer, "pad_values", 0.0))


# Below this many kernel inputs (kh*kw*C) the patch matrix is small: it is built
# channels-first, ``[B, kh*kw*C, positions]``, from one strided slice per kernel offset,
# and multiplied with dz in one batched matmul with no transposed operand. Above it, one
# batched matmul per kernel offset avoids both the patch matrix and stacked per-example
# gradients. For the first conv of the CNN benchmark (3x3x1 -> 32 on 28x28, batch 128,
# one thread, timed by hand): 2.3 ms with oneDNN and 7.7 ms without, where building the
# patches with a one-hot identity convolution took 3.1 and 14.8 ms (TensorFlow's own
# filter backprop: 1.9 and 8.7 ms).
_SMALL_PATCH_MAX_INPUTS = 32


def _slice_at(xp, i, j, out_hw, strides, dilations, channels_first=False):
    """The input values that kernel offset (i, j) sees, ``[B, Ho, Wo, C]`` (or
    ``[B, C, Ho, Wo]`` from a channels-first ``xp``)."""
    ho, wo = out_hw
    h0, w0 = i * dilations[0], j * dilations[1]
    rows = slice(h0, h0 + (ho - 1) * strides[0] + 1, strides[0])
    cols = slice(w0, w0 + (wo - 1) * strides[1] + 1, strides[1])
    return xp[:, :, rows, cols] if channels_first else xp[:, rows, cols, :]


def _kernel_per_example(xp, dz, kernel_size, strides, dilations, ste):
    """Per-example kernel gradients ``[B, kh, kw, C, F]``."""
    batch = tf.shape(xp)[0]
    channels, filters = xp.shape[-1], dz.shape[-1]
    dz_flat = tf.reshape(dz, [batch, -1, filters])
    out_hw = _out_hw(dz)
    per_offset = []
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            sl = tf.reshape(_slice_at(xp, i, j, out_hw, strides, dilations), [batch, -1, channels])
            per_offset.append(tf.matmul(sl, dz_flat, transpose_a=True))
    per_example = tf.reshape(tf.stack(per_offset, 1),
                             [batch, kernel_size[0], kernel_size[1], channels, filters])
    return per_example if ste is None else per_example * ste


def _bias_per_example(layer, dz, grads):
    if layer.use_bias:
        grads[var_key(layer.bias)] = tf.reduce_sum(tf.reshape(dz, [tf.shape(dz)[0], -1, dz.shape[-1]]), 1)
    return grads


def _kernel_grads(xp, dz, kernel_size, strides, dilations, ste):
    """Batch-summed kernel gradient ``[kh, kw, C, F]`` and per-example squared norms."""
    batch = tf.shape(xp)[0]
    channels, filters = xp.shape[-1], dz.shape[-1]
    dz_flat = tf.reshape(dz, [batch, -1, filters])
    n_inputs = kernel_size[0] * kernel_size[1] * channels
    kernel_shape = [kernel_size[0], kernel_size[1], channels, filters]
    out_hw = _out_hw(dz)
    if n_inputs <= _SMALL_PATCH_MAX_INPUTS:
        xc = tf.transpose(xp, [0, 3, 1, 2])  # [B, C, H, W]: a slice's rows are contiguous
        patches = tf.concat([  # [B, (i, j, c), positions]
            tf.reshape(_slice_at(xc, i, j, out_hw, strides, dilations, channels_first=True),
                       [batch, channels, -1])
            for i in range(kernel_size[0]) for j in range(kernel_size[1])], 1)
        per_example = tf.matmul(patches, dz_flat)  # [B, kh*kw*C, F]
        if ste is not None:
            per_example = per_example * tf.reshape(ste, [1, n_inputs, filters])
        return tf.reshape(tf.reduce_sum(per_example, 0), kernel_shape), reduce_sq(per_example)
    if not onednn_enabled():
        return _kernel_grads_by_rows(xp, dz_flat, kernel_size, strides, dilations, ste, out_hw, kernel_shape)
    sums, sq = [], None
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            sl = tf.reshape(_slice_at(xp, i, j, out_hw, strides, dilations), [batch, -1, channels])
            per_example = tf.matmul(sl, dz_flat, transpose_a=True)  # [B, C, F]
            if ste is not None:
                per_example = per_example * ste[i, j]
            sums.append(tf.reduce_sum(per_example, 0))
            part = reduce_sq(per_example)
            sq = part if sq is None else sq + part
    return tf.reshape(tf.stack(sums), kernel_shape), sq


def _kernel_grads_by_rows(xp, dz_flat, kernel_size, strides, dilations, ste, out_hw, kernel_shape):
    """:func:`_kernel_grads` with one batched matmul per kernel *row*: the ``kw`` column
    offsets' slices side by side, ``[B, positions, kw*C]``. Without oneDNN, TensorFlow's
    batched matmul runs small products poorly, and the wider one wins: 35.6 vs 40.4 ms
    for the second conv of the CNN benchmark (3x3x32 -> 64 on 13x13, batch 128, one
    thread, timed by hand; TensorFlow's filter backprop alone: 21.7 ms); with oneDNN it
    loses, 12.1 vs 10.5 ms."""
    batch, channels = tf.shape(xp)[0], xp.shape[-1]
    ho, wo = out_hw
    kh, kw = kernel_size
    columns = tf.concat([  # [B, H, Wo, kw*C]: column offset j's values, j-major
        xp[:, :, j * dilations[1]: j * dilations[1] + (wo - 1) * strides[1] + 1: strides[1], :]
        for j in range(kw)], -1)
    sums, sq = [], None
    for i in range(kh):
        h0 = i * dilations[0]
        row = tf.reshape(columns[:, h0: h0 + (ho - 1) * strides[0] + 1: strides[0]], [batch, -1, kw * channels])
        per_example = tf.matmul(row, dz_flat, transpose_a=True)  # [B, kw*C, F]
        if ste is not None:
            per_example = per_example * tf.reshape(ste[i], [1, kw * channels, -1])
        sums.append(tf.reduce_sum(per_example, 0))
        part = reduce_sq(per_example)
        sq = part if sq is None else sq + part
    return tf.reshape(tf.stack(sums), kernel_shape), sq


def _spatial_2d(layer):
    """Kernel size, strides and dilations in the 2-D view (Conv1D gets H = 1)."""
    if layer.rank == 1:
        return (1,) + tuple(layer.kernel_size), (1,) + tuple(layer.strides), (1,) + tuple(layer.dilation_rate)
    return tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)


def _check_common(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise NotSupported("data_format='channels_first'")
    if layer.activity_regularizer is not None:
        raise NotSupported("activity_regularizer is set")
    if getattr(layer, "groups", 1) != 1:
        raise NotSupported("groups != 1")
    if getattr(layer, "rank", 2) not in (1, 2):
        raise NotSupported("only 1-D and 2-D convolutions have a rule")


def _out_hw(t):
    shape = tf.shape(t)
    return [t.shape[i] if t.shape[i] is not None else shape[i] for i in (1, 2)]


def _with_bias(layer, sq, grads, dz):
    """Add the bias gradient: the per-example sum of dz over positions."""
    if layer.use_bias:
        db = tf.reduce_sum(tf.reshape(dz, [tf.shape(dz)[0], -1, dz.shape[-1]]), 1)
        grads[var_key(layer.bias)] = tf.reduce_sum(db, 0)
        sq = sq + tf.reduce_sum(tf.square(db), 1)
    return LayerGrads(grads, sq)


@register
class ConvRule(LayerRule):
    layer_types = tuple(_CONV)

    def check(self, layer):
        _check_common(layer)
        _quantized.check_quantizer(layer, "kernel_quantizer")

    def forward(self, layer, args, kwargs, mode):
        x = tf.cast(args[0], layer.compute_dtype)
        a = _quantized.quantize_input(layer, x)
        if layer.rank == 1:
            a = a[:, None]
        kernel, ste = _quantized.read_kernel(layer)
        if layer.rank == 1:
            kernel = kernel[None]
            ste = None if ste is None else ste[None]
        ks, st, dl = _spatial_2d(layer)
        xp = _pad_input(layer, a, ks, st, dl)
        # tf.nn.convolution (what Keras calls) lowers dilation to SpaceToBatchND + conv;
        # a dilated raw Conv2D has no input-gradient kernel on CPUs without oneDNN.
        z = tf.nn.convolution(xp, kernel, strides=st, padding="VALID", dilations=dl)
        if layer.use_bias:
            z = tf.nn.bias_add(z, layer.bias)
        out = z[:, 0] if layer.rank == 1 else z
        return apply_activation(layer, out), Trace(layer, self, [z], {"xp": xp}, {"ste": ste})

    def backward(self, trace, cotangents):
        layer, xp, ste = trace.layer, trace.context["xp"], trace.static["ste"]
        dz = cotangents[0]
        ks, st, dl = _spatial_2d(layer)
        kernel_sum, sq = _kernel_grads(xp, dz, ks, st, dl, ste)
        if layer.rank == 1:
            kernel_sum = kernel_sum[0]
        grads = {var_key(layer.kernel): kernel_sum}
        return _with_bias(layer, sq, grads, dz)

    def per_example_grads(self, trace, cotangents):
        layer, xp, ste = trace.layer, trace.context["xp"], trace.static["ste"]
        dz = cotangents[0]
        kernel = _kernel_per_example(xp, dz, *_spatial_2d(layer), ste)
        if layer.rank == 1:
            kernel = kernel[:, 0]
        return _bias_per_example(layer, dz, {var_key(layer.kernel): kernel})


def _depthwise_per_example(xp, du, ks, st, dl, multiplier):
    """Per-example depthwise kernel gradients ``[B, kh, kw, C, M]``."""
    ho_wo = _out_hw(du)
    channels = xp.shape[-1]
    du4 = tf.reshape(du, [tf.shape(du)[0], -1, channels, multiplier])
    grads = []
    for i in range(ks[0]):
        for j in range(ks[1]):
            sl = tf.reshape(_slice_at(xp, i, j, ho_wo, st, dl), [tf.shape(xp)[0], -1, channels])
            grads.append(tf.einsum("blc,blcm->bcm", sl, du4))
    stacked = tf.stack(grads, axis=1)
    return tf.reshape(stacked, [tf.shape(xp)[0], ks[0], ks[1], channels, multiplier])


@register
class DepthwiseConvRule(LayerRule):
    layer_types = tuple(_DEPTHWISE)

    def check(self, layer):
        _check_common(layer)
        _quantized.check_quantizer(layer, "depthwise_quantizer")

    def forward(self, layer, args, kwargs, mode):
        x = tf.cast(args[0], layer.compute_dtype)
        a = _quantized.quantize_input(layer, x)
        kernel, ste = _quantized.read_kernel(layer, "depthwise_kernel", "depthwise_quantizer")
        ks, st, dl = _spatial_2d(layer)
        xp = _pad_input(layer, a, ks, st, dl)
        z = tf.nn.depthwise_conv2d(xp, kernel, strides=[1, *st, 1], padding="VALID", dilations=dl)
        if layer.use_bias:
            z = tf.nn.bias_add(z, layer.bias)
        return apply_activation(layer, z), Trace(layer, self, [z], {"xp": xp}, {"ste": ste})

    def per_example_grads(self, trace, cotangents):
        layer, xp, ste = trace.layer, trace.context["xp"], trace.static["ste"]
        dz = cotangents[0]
        ks, st, dl = _spatial_2d(layer)
        per_example = _depthwise_per_example(xp, dz, ks, st, dl, layer.depth_multiplier)
        if ste is not None:
            per_example = per_example * ste
        return _bias_per_example(layer, dz, {var_key(layer.depthwise_kernel): per_example})


@register
class SeparableConvRule(LayerRule):
    layer_types = (keras.layers.SeparableConv2D,)

    def check(self, layer):
        _check_common(layer)

    def forward(self, layer, args, kwargs, mode):
        x = tf.cast(args[0], layer.compute_dtype)
        ks, st, dl = _spatial_2d(layer)
        xp = _pad_input(layer, x, ks, st, dl)
        u = tf.nn.depthwise_conv2d(xp, layer.depthwise_kernel, strides=[1, *st, 1],
                                   padding="VALID", dilations=dl)
        z = tf.nn.conv2d(u, layer.pointwise_kernel, strides=1, padding="VALID")
        if layer.use_bias:
            z = tf.nn.bias_add(z, layer.bias)
        return apply_activation(layer, z), Trace(layer, self, [u, z], {"xp": xp, "u": u})

    def per_example_grads(self, trace, cotangents):
        layer, xp, u = trace.layer, trace.context["xp"], trace.context["u"]
        du, dz = cotangents
        ks, st, dl = _spatial_2d(layer)
        batch = tf.shape(u)[0]
        pointwise = tf.matmul(tf.reshape(u, [batch, -1, u.shape[-1]]),
                              tf.reshape(dz, [batch, -1, dz.shape[-1]]), transpose_a=True)
        grads = {
            var_key(layer.depthwise_kernel): _depthwise_per_example(xp, du, ks, st, dl, layer.depth_multiplier),
            var_key(layer.pointwise_kernel): tf.reshape(pointwise, [batch, *layer.pointwise_kernel.shape]),
        }
        return _bias_per_example(layer, dz, grads)
