"""Generic fallback for layers with weights and no rule: per-example gradients of the
layer's own weights by a vectorized vector-Jacobian product of the layer alone.

For example ``i`` the gradient of the loss with respect to the layer's weights is
``VJP(layer at input a_i, cotangent dy_i)`` where ``dy_i`` comes from the single
backward pass of the whole model -- exact whenever the layer treats examples
independently, and far cheaper than differentiating the whole model per example.
It is computed in chunks of examples with ``tf.vectorized_map`` (memory: chunk x
layer parameters). A layer that mixes examples (batch statistics, ...) would make
the per-example VJPs disagree with the batch gradient; the engine checks that sum
and raises rather than report a wrong number.
"""
from keras_coherence._keras import tf
from keras_coherence.coherence.registry import LayerRule, Trace, var_key

DEFAULT_CHUNK = 64


def _is_batched(t):
    return isinstance(t, (tf.Tensor, tf.Variable)) and t.shape.rank and t.shape.rank > 0


class FallbackRule(LayerRule):
    """Not registered for any type: the engine uses it for layers without a rule."""

    chunk_size = DEFAULT_CHUNK

    def forward(self, layer, args, kwargs, mode):
        out = layer(*args, **kwargs)
        flat_out = [t for t in tf.nest.flatten(out)]
        watched = [t for t in flat_out if t.dtype.is_floating]
        return out, Trace(layer, self, watched, {"args": args, "kwargs": kwargs})

    def per_example_grads(self, trace, cotangents):
        return {var_key(v): g for v, g in zip(trace.layer.trainable_weights,
                                              self.per_example_list(trace, cotangents))}

    def per_example_list(self, trace, cotangents):
        """Per-example gradients ``[B, *var.shape]`` of each trainable weight, in order."""
        layer = trace.layer
        variables = layer.trainable_weights
        structure = (trace.context["args"], trace.context["kwargs"])
        flat = tf.nest.flatten(structure)
        mapped_idx = [i for i, t in enumerate(flat) if _is_batched(t)]

        def one_example(elems):
            inputs_i, cots_i = elems
            flat_i = list(flat)
            for idx, t in zip(mapped_idx, inputs_i):
                flat_i[idx] = t[None]
            args_i, kwargs_i = tf.nest.pack_sequence_as(structure, flat_i)
            with tf.GradientTape() as tape:
                out = layer(*args_i, **kwargs_i)
            floating = [t for t in tf.nest.flatten(out) if t.dtype.is_floating]
            return tape.gradient(floating, variables, output_gradients=[c[None] for c in cots_i],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)

        inputs = [flat[i] for i in mapped_idx]
        batch = inputs[0].shape[0]
        if batch is None or batch <= self.chunk_size:
            return tf.vectorized_map(one_example, (inputs, list(cotangents)))
        chunks = []
        for start in range(0, batch, self.chunk_size):
            end = min(start + self.chunk_size, batch)
            chunks.append(tf.vectorized_map(
                one_example, ([t[start:end] for t in inputs], [c[start:end] for c in cotangents])))
        return [tf.concat(parts, 0) for parts in zip(*chunks)]


FALLBACK = FallbackRule()
