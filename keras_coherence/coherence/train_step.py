"""A ``train_step`` that trains exactly as Keras does and also reports the training
mini-batch's m-coherence and alpha on every step, from the same backward pass."""
from __future__ import annotations

from keras_coherence._functional import FunctionalWithExtras
from keras_coherence._keras import keras, loss_scaler, tf
from keras_coherence.coherence.engine import traced_backward
from keras_coherence.coherence.registry import var_key
from keras_coherence.coherence.tracing import is_graph_network


def _reg_loss(model):
    from tf_keras.src.utils import losses_utils  # same scaling as Keras's compiled loss

    if not model.losses:
        return None
    return losses_utils.scale_loss_for_distribution(tf.add_n(model.losses))


def _replicated():
    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False


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
    if _replicated():
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


def coherence_train_step(model, data, per_layer: bool = False):
    """One optimizer step on ``data`` plus the batch's coherence statistics.

    The update is the model's usual gradient (compiled loss, regularization, sample
    weights); BatchNormalization runs in training mode, so per-example quantities are
    each example's contribution to the batch gradient. Under ``tf.distribute`` the sums
    are all-reduced across replicas, giving the global batch's numbers.
    Returns ``(logs, y_pred, grads_and_vars)``; the gradients are already combined
    across replicas (apply them with ``skip_gradients_aggregation=True``): the one
    all-reduce of the data gradients serves both the statistics and the update.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    result = traced_backward(
        model, x, lambda y_pred: model.compute_loss(x, y, y_pred, sample_weight), "train",
        tape_extra=lambda: _reg_loss(model), loss_scaler=loss_scaler(model.optimizer),
    )
    variables = model.trainable_variables
    reg_grads = [None] * len(variables)
    if result.extra is not None:
        reg_grads = result.tape.gradient(result.extra, variables)
    grads = []
    data_grads = []
    for v, rg in zip(variables, reg_grads):
        key = var_key(v)
        if key in result.fallback_grads:  # tape gradient: data and regularization together
            grads.append(result.fallback_grads[key])
            data_grads.append(result.grads.get(key))
            continue
        g = result.grads.get(key)
        data_grads.append(g)
        if rg is not None:
            g = rg if g is None else tf.convert_to_tensor(g) + rg
        grads.append(g)

    logs, data_sums = coherence_logs(result, variables, x, data_grads, per_layer)
    if _replicated():
        # Each replica's regularization gradient is the same (mirrored weights; Keras
        # scales the loss by 1/replicas), so the all-reduced update is the all-reduced
        # data gradient plus replicas x the local one: no second model-size all-reduce.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        grads = [None if g is None else d if rg is None else d + replicas * rg
                 for g, d, rg in zip(grads, data_sums, reg_grads)]
    return logs, result.y_pred, list(zip(grads, variables))


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
        logs, y_pred, grads_and_vars = coherence_train_step(self, data, self.coherence_per_layer)
        self.optimizer.apply_gradients([(g, v) for g, v in grads_and_vars if g is not None],
                                       skip_gradients_aggregation=True)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        metrics = self.compute_metrics(x, y, y_pred, sample_weight)
        return {**metrics, **logs}


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
