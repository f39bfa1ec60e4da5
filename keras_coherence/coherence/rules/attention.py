"""MultiHeadAttention: its query, key, value and output projections (EinsumDense layers
inside it) each through the EinsumDense rule.

The forward pass is Keras's own (the layer's mask computation and its attention, with
dropout in training mode only); the four projections' pre-activations are watched, so
one backward pass gives each projection's cotangent, and the layer's gradients and
per-example squared norms are the projections' sums.
"""
from __future__ import annotations

import inspect

from keras_coherence._internals.keras_private import (
    attention, attention_built, attention_mask, attention_projection,
)
from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import LayerGrads, LayerRule, NotSupported, Trace, register
from keras_coherence.coherence.rules.einsum import EinsumDenseRule

_PROJECTIONS = ("query", "key", "value", "output")
_EINSUM = EinsumDenseRule()


def _sub_trace(trace, name):
    return Trace(attention_projection(trace.layer, name), _EINSUM, [], trace.context[name], trace.static[name])


@register
class MultiHeadAttentionRule(LayerRule):
    layer_types = (keras.layers.MultiHeadAttention,)

    def check(self, layer):
        if layer.activity_regularizer is not None:
            raise NotSupported("activity_regularizer is set")
        if not attention_built(layer):
            raise NotSupported("the layer has not been called yet (its projections do not exist)")
        for name in _PROJECTIONS:
            dense = attention_projection(layer, name)
            if type(dense) is not keras.layers.EinsumDense:
                raise NotSupported(f"its {name} projection is a {type(dense).__name__}, not an EinsumDense")
            _EINSUM.check(dense)
        own = {id(v) for v in layer.trainable_weights}
        projected = {id(v) for name in _PROJECTIONS for v in attention_projection(layer, name).trainable_weights}
        if own != projected:
            raise NotSupported("it has trainable weights outside its four projections")

    def forward(self, layer, args, kwargs, mode):
        call = inspect.signature(keras.layers.MultiHeadAttention.call).bind(layer, *args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        query, value, key = a["query"], a["value"], a["key"]
        if any(isinstance(t, tf.RaggedTensor) for t in (query, value, key)):
            raise ValueError(f"layer {layer.name!r}: keras_coherence's MultiHeadAttention rule takes "
                             "dense tensors; convert ragged inputs with .to_tensor() first")
        key = value if key is None else key
        mask = attention_mask(layer, query, value, key, a["attention_mask"], a["use_causal_mask"])
        traces, outs = {}, {}
        for name, inputs in (("query", query), ("key", key), ("value", value)):
            outs[name], traces[name] = _EINSUM.forward(attention_projection(layer, name), [inputs], {}, mode)
        attended, scores = attention(layer, outs["query"], outs["key"], outs["value"], mask, training=mode == "train")
        out, traces["output"] = _EINSUM.forward(attention_projection(layer, "output"), [attended], {}, mode)
        trace = Trace(layer, self, [traces[n].watched[0] for n in _PROJECTIONS],
                      {n: traces[n].context for n in _PROJECTIONS},
                      {n: traces[n].static for n in _PROJECTIONS})
        return ((out, scores) if a["return_attention_scores"] else out), trace

    def backward(self, trace, cotangents):
        grads, sq = {}, None
        for name, dz in zip(_PROJECTIONS, cotangents):
            part = _EINSUM.backward(_sub_trace(trace, name), [dz])
            grads.update(part.sum_grads)
            sq = part.sq_norms if sq is None else sq + part.sq_norms
        return LayerGrads(grads, sq)

    def per_example_grads(self, trace, cotangents):
        grads = {}
        for name, dz in zip(_PROJECTIONS, cotangents):
            grads.update(_EINSUM.per_example_grads(_sub_trace(trace, name), [dz]))
        return grads
