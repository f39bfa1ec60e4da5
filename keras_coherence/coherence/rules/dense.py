"""Dense (and larq QuantDense): ghost norm ``||a_i||^2 ||dz_i||^2`` for 2-D inputs."""
from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import (
    LayerGrads, LayerRule, NotSupported, Trace, apply_activation, reduce_sq, register,
    var_key,
)
from keras_coherence.coherence.rules import _quantized

_TYPES = [keras.layers.Dense, "larq.layers.QuantDense"]  # larq by name: loaded only when used


def positions_matmul_grads(a3, dz3, ste=None):
    """``(kernel gradient summed over the batch, per-example squared norms [B])`` of
    ``z[b, p] = a[b, p] @ W`` (``a3`` ``[B, P, I]``, ``dz3`` ``[B, P, O]``): example ``b``'s
    gradient is ``sum_p a[b, p] (outer) dz[b, p]``.

    Its squared norm comes from the Gram matrices, ``sum_pq (a_p . a_q)(dz_p . dz_q)``,
    when ``P (I + O) < I O``, else from the per-example ``[B, I, O]`` gradients (whose
    batch sum is then the kernel gradient). The Gram form adds ``P^2 (I + O)``
    multiply-adds per example to one large product for the batch sum; the per-example
    form runs ``B`` small ``P``-deep products and writes ``B I O`` values, which on a CPU
    costs more than its multiply-add count says: ``[64, 64, 128]`` and ``[64, 64, 512]``
    took 24 ms as Gram + batch product and 42 ms as per-example products (by hand, TensorFlow
    2.21, 2 threads). ``ste`` (``[I, O]``, larq's clipped straight-through mask of the
    kernel, or None) multiplies every gradient and needs the per-example form.
    """
    positions, n_in, n_out = a3.shape[1], a3.shape[2], dz3.shape[2]
    if ste is None and positions is not None and positions * (n_in + n_out) < n_in * n_out:
        gram = tf.matmul(a3, a3, transpose_b=True) * tf.matmul(dz3, dz3, transpose_b=True)
        kernel_sum = tf.matmul(tf.reshape(a3, [-1, n_in]), tf.reshape(dz3, [-1, n_out]), transpose_a=True)
        return kernel_sum, tf.reduce_sum(gram, [1, 2])
    per_example = tf.matmul(a3, dz3, transpose_a=True)  # [batch, in, out]
    if ste is not None:
        per_example = per_example * ste
    return tf.reduce_sum(per_example, 0), reduce_sq(per_example)


@register
class DenseRule(LayerRule):
    layer_types = tuple(_TYPES)

    def check(self, layer):
        if layer.activity_regularizer is not None:
            raise NotSupported("activity_regularizer is set")
        _quantized.check_quantizer(layer, "kernel_quantizer")

    def forward(self, layer, args, kwargs, mode):
        x = tf.cast(args[0], layer.compute_dtype)
        a = _quantized.quantize_input(layer, x)
        kernel, ste = _quantized.read_kernel(layer)
        if a.shape.rank == 2:
            z = tf.matmul(a, kernel)
        else:
            z = tf.tensordot(a, kernel, [[a.shape.rank - 1], [0]])
        if layer.use_bias:
            z = tf.nn.bias_add(z, layer.bias)
        return apply_activation(layer, z), Trace(layer, self, [z], {"a": a}, {"ste": ste})

    def backward(self, trace, cotangents):
        layer = trace.layer
        a, ste = trace.context["a"], trace.static["ste"]
        dz = cotangents[0]
        if a.shape.rank == 2:
            kernel_sum = tf.matmul(a, dz, transpose_a=True)
            if ste is None:
                sq = tf.reduce_sum(tf.square(a), 1) * tf.reduce_sum(tf.square(dz), 1)
            else:  # ||(a_i outer dz_i) * D||^2 = (a_i^2)^T D^2 (dz_i^2)
                sq = tf.reduce_sum(tf.matmul(tf.square(a), tf.square(ste)) * tf.square(dz), 1)
            bias_sum, bias_sq = tf.reduce_sum(dz, 0), tf.reduce_sum(tf.square(dz), 1)
        else:  # [batch, ..., in]: per-example kernel gradient is a sum over positions
            batch = tf.shape(a)[0]
            a3 = tf.reshape(a, [batch, -1, a.shape[-1]])
            dz3 = tf.reshape(dz, [batch, -1, dz.shape[-1]])
            kernel_sum, sq = positions_matmul_grads(a3, dz3, ste)
            ste = None
            db = tf.reduce_sum(dz3, 1)
            bias_sum, bias_sq = tf.reduce_sum(db, 0), reduce_sq(db)
        if ste is not None:
            kernel_sum = kernel_sum * ste
        grads = {var_key(layer.kernel): kernel_sum}
        if layer.use_bias:
            grads[var_key(layer.bias)] = bias_sum
            sq = sq + bias_sq
        return LayerGrads(grads, sq)

    def per_example_grads(self, trace, cotangents):
        layer, a, ste = trace.layer, trace.context["a"], trace.static["ste"]
        dz = cotangents[0]
        batch = tf.shape(a)[0]
        a3 = tf.reshape(a, [batch, -1, a.shape[-1]])
        dz3 = tf.reshape(dz, [batch, -1, dz.shape[-1]])
        kernel = tf.matmul(a3, dz3, transpose_a=True)  # [B, in, out]
        if ste is not None:
            kernel = kernel * ste
        grads = {var_key(layer.kernel): kernel}
        if layer.use_bias:
            grads[var_key(layer.bias)] = tf.reduce_sum(dz3, 1)
        return grads
