"""Embedding: example i's table gradient puts ``dz_it`` in row ``token_it``, so its
squared norm is ``sum over token pairs with equal ids of <dz_it, dz_is>``."""
from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import (
    LayerGrads, LayerRule, NotSupported, Trace, register, var_key,
)


@register
class EmbeddingRule(LayerRule):
    layer_types = (keras.layers.Embedding,)

    def check(self, layer):
        if layer.activity_regularizer is not None:
            raise NotSupported("activity_regularizer is set")
        if getattr(layer, "sparse", False):
            raise NotSupported("sparse=True")

    def forward(self, layer, args, kwargs, mode):
        ids = tf.cast(args[0], "int32")
        z = tf.gather(tf.convert_to_tensor(layer.embeddings), ids)
        z = tf.cast(z, layer.compute_dtype)
        return z, Trace(layer, self, [z], {"ids": ids})

    def backward(self, trace, cotangents):
        layer, ids, dz = trace.layer, trace.context["ids"], cotangents[0]
        batch, dim = tf.shape(dz)[0], dz.shape[-1]
        ids2 = tf.reshape(ids, [batch, -1])
        dz3 = tf.reshape(dz, [batch, -1, dim])
        same = tf.cast(tf.equal(ids2[:, :, None], ids2[:, None, :]), dz.dtype)
        sq = tf.reduce_sum(tf.matmul(dz3, dz3, transpose_b=True) * same, [1, 2])
        table_grad = tf.IndexedSlices(
            tf.reshape(dz3, [-1, dim]), tf.reshape(ids2, [-1]), tf.shape(layer.embeddings)
        )
        return LayerGrads({var_key(layer.embeddings): table_grad}, sq)

    def per_example_grads(self, trace, cotangents):
        layer, ids, dz = trace.layer, trace.context["ids"], cotangents[0]
        batch, dim = tf.shape(dz)[0], dz.shape[-1]
        onehot = tf.one_hot(tf.reshape(ids, [batch, -1]), layer.input_dim, dtype=dz.dtype)
        table = tf.matmul(onehot, tf.reshape(dz, [batch, -1, dim]), transpose_a=True)  # [B, V, d]
        return {var_key(layer.embeddings): table}
