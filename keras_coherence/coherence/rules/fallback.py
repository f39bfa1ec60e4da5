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

Recurrent layers (LSTM, GRU, Bidirectional, ...) run a ``while_loop`` whose gradient
``tf.vectorized_map`` cannot vectorize; for them, and for any layer whose
vectorization fails, the same per-example VJPs run one example after another with
``tf.map_fn`` -- equally exact, and slower by roughly the chunk size.
"""
import logging

from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import LayerRule, Trace, var_key

DEFAULT_CHUNK = 64

# Layer types known to defeat pfor (their backward is a while_loop over TensorLists):
# go straight to the sequential map instead of paying for a failed conversion.
_SEQUENTIAL_TYPES = (keras.layers.RNN, keras.layers.Bidirectional)
# What a failed pfor conversion raises while the step is being traced.
_PFOR_ERRORS = (TypeError, ValueError, NotImplementedError, tf.errors.InvalidArgumentError)


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
            # The engine's cotangents are float32 (unscaled); a mixed-precision layer's
            # outputs are float16/bfloat16.
            return tape.gradient(floating, variables,
                                 output_gradients=[tf.cast(c[None], t.dtype) for c, t in zip(cots_i, floating)],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)

        inputs = [flat[i] for i in mapped_idx]
        signature = [tf.TensorSpec(v.shape, v.dtype) for v in variables]

        def sequential(elems):
            return tf.map_fn(one_example, elems, fn_output_signature=signature)

        if isinstance(layer, _SEQUENTIAL_TYPES):
            return sequential((inputs, list(cotangents)))
        batch = inputs[0].shape[0]
        if batch is None or batch <= self.chunk_size:
            return _vectorized_or_sequential(one_example, (inputs, list(cotangents)), sequential)
        chunks = []
        for start in range(0, batch, self.chunk_size):
            end = min(start + self.chunk_size, batch)
            chunks.append(_vectorized_or_sequential(
                one_example, ([t[start:end] for t in inputs], [c[start:end] for c in cotangents]),
                sequential))
        return [tf.concat(parts, 0) for parts in zip(*chunks)]


def _vectorized_or_sequential(fn, elems, sequential):
    """``tf.vectorized_map(fn, elems)``, or ``sequential(elems)`` where pfor cannot
    convert the layer (its conversion errors are logged by TF at ERROR level: muted)."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return tf.vectorized_map(fn, elems)
    except _PFOR_ERRORS:
        return sequential(elems)
    finally:
        logger.setLevel(level)


FALLBACK = FallbackRule()
