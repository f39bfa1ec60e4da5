"""A ``train_step`` that trains exactly as Keras does and also reports the training
mini-batch's m-coherence and alpha on every step, from the same backward pass."""
from __future__ import annotations

import functools

from keras_coherence._functional import FunctionalWithExtras
from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import var_key
from keras_coherence.coherence.step import (
    StepDirection, TracedBatch, in_replica_context, traced_train_step, traced_update,
)
from keras_coherence.coherence.tracing import is_graph_network


def coherence_logs(result, variables, x, data_grads, per_layer: bool = False):
    """``({"m_coherence", "alpha"[, "m_coherence/<layer>"]}, data_sums)`` of the batch from
    a :func:`traced_backward` result and its per-variable batch-summed data gradients;
    under ``tf.distribute`` the sums are all-reduced, giving the global batch's values:
    ``data_sums`` are the data gradients summed over every replica (dense)."""
    dense = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for v, g in zip(variables, data_grads)]
    names = list(result.layer_sq)
    layer_q = [tf.reduce_sum(result.layer_sq[n]) for n in names]
    key_index = {var_key(v): i for i, v in enumerate(variables)}
    batch = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
    if in_replica_context():
        dense, layer_q, batch = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, (dense, layer_q, batch))
    layer_s = [tf.add_n([tf.reduce_sum(tf.square(dense[key_index[k]])) for k in result.layer_vars[n]])
               for n in names]
    m_coherence = tf.math.divide_no_nan(tf.add_n(layer_s), tf.add_n(layer_q))
    logs = {"m_coherence": m_coherence, "alpha": m_coherence / batch}
    if per_layer:
        for n, s_, q in zip(names, layer_s, layer_q):
            logs[f"m_coherence/{n}"] = tf.math.divide_no_nan(s_, q)
    return logs, dense


def batch_gradient_direction(batch: TracedBatch, per_layer: bool = False) -> StepDirection:
    """The direction of a plain Keras step -- the batch gradient -- with the batch's
    coherence statistics as logs; the one all-reduce of the data gradients under
    ``tf.distribute`` serves both."""
    data_grads = batch.data_grads()
    logs, data_sums = coherence_logs(batch.result, batch.variables, batch.x, data_grads, per_layer)
    if in_replica_context():
        return StepDirection([None if g is None else s for g, s in zip(data_grads, data_sums)], logs)
    # On one replica a fallback layer's weights take the engine's tape gradient (data and
    # regularization together): Keras's own update even for a layer that mixes examples.
    tape_grads = batch.result.fallback_grads
    keys = [var_key(v) for v in batch.variables]
    data = [tape_grads.get(k, g) for k, g in zip(keys, data_grads)]
    return StepDirection(data, logs, frozenset(i for i, k in enumerate(keys) if k in tape_grads))


def coherence_train_step(model, data, per_layer: bool = False):
    """The update of one optimizer step on ``data``, plus the batch's coherence statistics.

    The update is the model's usual gradient (compiled loss, regularization, sample
    weights); BatchNormalization runs in training mode, so per-example quantities are
    each example's contribution to the batch gradient. Under ``tf.distribute`` the sums
    are all-reduced across replicas, giving the global batch's numbers.
    Returns ``(logs, y_pred, grads_and_vars)``; the gradients are already combined
    across replicas (apply them with ``skip_gradients_aggregation=True``): the one
    all-reduce of the data gradients serves both the statistics and the update.
    """
    return traced_update(model, data, functools.partial(batch_gradient_direction, per_layer=per_layer))


@keras.utils.register_keras_serializable(package="keras_coherence")
class CoherenceModel(FunctionalWithExtras):
    """A Functional model whose ``fit`` also logs the training batch's ``m_coherence``
    and ``alpha`` on every step (at about the cost of a plain step).

    Build it like any Functional model, or wrap an existing one with
    :func:`with_coherence`. Everything else -- ``compile``, ``fit``, callbacks,
    ``save`` -- is plain Keras.

    Example:
      >>> import numpy as np, keras_coherence as kc
      >>> inputs = kc.keras.Input((4,))
      >>> outputs = kc.keras.layers.Dense(2)(inputs)
      >>> model = kc.coherence.CoherenceModel(inputs, outputs)
      >>> model.compile("sgd", kc.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      >>> h = model.fit(np.ones((8, 4)), np.zeros(8), verbose=0)
      >>> sorted(k for k in h.history if k in ("alpha", "m_coherence"))
      ['alpha', 'm_coherence']
    """

    EXTRA_CONFIG = ("coherence_per_layer",)

    def __init__(self, *args, coherence_per_layer: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_graph_network(self):
            raise TypeError(
                "CoherenceModel must be built as a Functional model: "
                "CoherenceModel(inputs, outputs). For a Sequential model use with_coherence(model)."
            )
        self.coherence_per_layer = coherence_per_layer

    def train_step(self, data):
        direction = functools.partial(batch_gradient_direction, per_layer=self.coherence_per_layer)
        return traced_train_step(self, data, direction)


def with_coherence(model, per_layer: bool = False) -> CoherenceModel:
    """A :class:`CoherenceModel` sharing ``model``'s layers and weights (train either)."""
    if not is_graph_network(model):
        raise TypeError(
            f"with_coherence needs a Sequential or Functional model; {model.name!r} is a "
            "subclassed model. Use keras_coherence.callbacks.CoherenceMonitor instead, which "
            "works with any model."
        )
    return CoherenceModel(model.inputs, model.outputs, name=f"{model.name}_coherence",
                          coherence_per_layer=per_layer)
