"""BatchNormalization and LayerNormalization: per-example gradients of the affine
parameters, ``dgamma_i = sum(dz_i * xhat_i)`` and ``dbeta_i = sum(dz_i)`` over the
non-channel axes.

BatchNormalization has three modes (``mode`` argument of the engine):

* ``"inference"`` (default for measurement): moving statistics, so every example's
  gradient is its own -- the per-example gradient of a fixed function.
* ``"batch"``: statistics of the batch being measured (moving statistics untouched).
  Examples then interact through the statistics; what is reported is each example's
  *contribution* to the batch gradient (these sum exactly to it).
* ``"train"``: as ``"batch"`` but the layer also updates its moving statistics (the
  forward pass of a training step).
"""
from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import (
    LayerRule, NotSupported, Trace, register, var_key,
)


def _axes(layer, rank):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % rank for a in axis)


def _broadcast(v, channel_axes, rank, x_shape):
    shape = [1] * rank
    for a in channel_axes:
        shape[a] = x_shape[a]
    return tf.reshape(v, shape)


def _affine_per_example(layer, dz, xhat, channel_axes):
    """``{var_key: [B, *param_shape]}`` for gamma and beta."""
    rank = dz.shape.rank
    reduce_axes = [a for a in range(1, rank) if a not in channel_axes]
    out = {}
    for var, values in ((getattr(layer, "gamma", None), dz * xhat), (getattr(layer, "beta", None), dz)):
        if var is None:
            continue
        values = tf.reduce_sum(values, reduce_axes) if reduce_axes else values
        out[var_key(var)] = tf.reshape(values, [-1] + list(var.shape))
    return out


class _AffineRule(LayerRule):
    def per_example_grads(self, trace, cotangents):
        return _affine_per_example(trace.layer, cotangents[0], trace.context["xhat"], trace.static["axes"])


@register
class BatchNormRule(_AffineRule):
    layer_types = (keras.layers.BatchNormalization,)

    def check(self, layer):
        if layer.renorm:
            raise NotSupported("renorm=True")
        if layer.virtual_batch_size is not None:
            raise NotSupported("virtual_batch_size is set")
        if layer.adjustment is not None:
            raise NotSupported("adjustment is set")
        if getattr(layer, "synchronized", False):
            raise NotSupported("synchronized=True")

    def forward(self, layer, args, kwargs, mode):
        x = tf.cast(args[0], layer.compute_dtype)
        rank = x.shape.rank
        channel_axes = _axes(layer, rank)
        stat_axes = [a for a in range(rank) if a not in channel_axes]
        x_shape = tf.shape(x)
        gamma = getattr(layer, "gamma", None)
        beta = getattr(layer, "beta", None)
        if mode == "inference":
            y = layer(x, training=False)
            mean = _broadcast(layer.moving_mean, channel_axes, rank, x_shape)
            var = _broadcast(layer.moving_variance, channel_axes, rank, x_shape)
            xhat = (x - mean) * tf.math.rsqrt(var + layer.epsilon)
        else:
            mean, var = tf.nn.moments(x, stat_axes, keepdims=True)
            xhat = (x - mean) * tf.math.rsqrt(var + layer.epsilon)
            if mode == "train":
                y = layer(x, training=True)  # real layer: moving statistics get updated
            else:
                y = xhat
                if gamma is not None:
                    y = y * _broadcast(gamma, channel_axes, rank, x_shape)
                if beta is not None:
                    y = y + _broadcast(beta, channel_axes, rank, x_shape)
            xhat = tf.stop_gradient(xhat)
        return y, Trace(layer, self, [y], {"xhat": xhat}, {"axes": channel_axes})



@register
class LayerNormRule(_AffineRule):
    layer_types = (keras.layers.LayerNormalization,)

    def forward(self, layer, args, kwargs, mode):
        x = tf.cast(args[0], layer.compute_dtype)
        channel_axes = _axes(layer, x.shape.rank)
        y = layer(x)
        mean, var = tf.nn.moments(x, channel_axes, keepdims=True)
        xhat = tf.stop_gradient((x - mean) * tf.math.rsqrt(var + layer.epsilon))
        return y, Trace(layer, self, [y], {"xhat": xhat}, {"axes": channel_axes})
