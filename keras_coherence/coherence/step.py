"""The traced training step that :class:`CoherenceModel` and ``AggregatedModel`` share.

One step: unpack the batch, run the engine's single traced forward and backward pass
(with Keras's loss scaling under mixed precision), differentiate the regularization
loss, add its gradient to the data part of the update, apply the update and compute
the compiled metrics. Only the data part of the update, and extra logs, differ between
the two models; a *direction* -- ``direction(batch) -> StepDirection`` -- computes them
from the engine's per-example quantities (the batch gradient and its coherence, or an
aggregator's update).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, FrozenSet, List

from keras_coherence._internals.keras_private import optimizer_built, variable_losses, variables_not_built_for
from keras_coherence._keras import keras, loss_scaler, tf
from keras_coherence.coherence.engine import BackwardResult, traced_backward
from keras_coherence.coherence.registry import var_key


def in_replica_context() -> bool:
    """True inside a ``tf.distribute`` replica function (Keras's train function under a
    strategy): this replica sees its share of the batch only, and the global batch's
    numbers need collectives."""
    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False


def replicas_in_sync() -> int:
    """The number of replicas whose gradients make one update (1 outside a replica function)."""
    return tf.distribute.get_replica_context().num_replicas_in_sync if in_replica_context() else 1


def regularization_loss(model):
    """The sum of the model's weight regularizers (``keras_private.variable_losses``),
    scaled as Keras's compiled loss scales it: divided by the replicas in sync, since an
    update sums the replicas' gradients; None when there are none.

    The losses a call adds from its tensors (activity regularizers) are not here: they are
    in the compiled loss the engine differentiates, and reach every weight through the
    layer outputs, per example, like the data loss."""
    losses = variable_losses(model)
    if not losses:
        return None
    loss = tf.add_n(losses)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss *= 1.0 / replicas
    return loss


@dataclasses.dataclass
class TracedBatch:
    """One training batch after the engine's forward and backward pass: what a
    direction reads. ``variables`` are the model's trainable variables, in the order
    of every per-variable list of the step."""

    x: object
    result: BackwardResult
    variables: list

    def data_grads(self) -> list:
        """Per variable, this replica's batch-summed gradient of the data loss as the
        layer rules give it (None for a variable no layer output depends on)."""
        return [self.result.grads.get(var_key(v)) for v in self.variables]


@dataclasses.dataclass
class StepDirection:
    """What a direction returns for one batch.

    ``data``: per variable, the data part of the update, already summed over replicas
    (None: no update from the data). ``logs``: extra metrics of the step.
    ``with_regularization``: indices of ``data`` entries that already include the
    regularization gradient (the engine's tape gradient of a fallback layer), to which
    the step adds nothing.
    """

    data: List[object]
    logs: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)
    with_regularization: FrozenSet[int] = frozenset()


Direction = Callable[[TracedBatch], StepDirection]


def traced_update(model, data, direction: Direction):
    """``(logs, y_pred, grads_and_vars)`` of one step of ``model`` on ``data``, whose
    data part of the update is ``direction``'s.

    The gradients are already combined across replicas: apply them with
    ``skip_gradients_aggregation=True`` (a direction's collectives serve both its
    statistics and the update).
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    result = traced_backward(
        model, x, lambda y_pred: model.compute_loss(x, y, y_pred, sample_weight), "train",
        tape_extra=lambda: regularization_loss(model), loss_scaler=loss_scaler(model.optimizer))
    variables = model.trainable_variables
    reg_grads = [None] * len(variables)
    if result.extra is not None:
        reg_grads = result.tape.gradient(result.extra, variables)
    chosen = direction(TracedBatch(x, result, variables))
    replicas = replicas_in_sync()
    if replicas > 1:  # a weight regularizer's gradient is the same on every replica (mirrored weights)
        reg_grads = [None if g is None else replicas * g for g in reg_grads]
    grads = []
    for i, (g, rg) in enumerate(zip(chosen.data, reg_grads)):
        if rg is not None and i not in chosen.with_regularization:
            g = rg if g is None else tf.convert_to_tensor(g) + rg
        grads.append(g)
    return chosen.logs, result.y_pred, list(zip(grads, variables))


def traced_train_step(model, data, direction: Direction) -> Dict[str, tf.Tensor]:
    """A Keras ``train_step``: :func:`traced_update`'s update applied by the model's
    optimizer; returns the compiled metrics and the direction's logs."""
    logs, y_pred, grads_and_vars = traced_update(model, data, direction)
    grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
    check_optimizer_owns(model.optimizer, [v for _, v in grads_and_vars], model.name)
    model.optimizer.apply_gradients(grads_and_vars, skip_gradients_aggregation=True)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return {**model.compute_metrics(x, y, y_pred, sample_weight), **logs}


def check_optimizer_owns(optimizer, variables, model_name):
    """A clear error, instead of Keras's bare KeyError, when ``optimizer`` was built for
    other variables: one optimizer instance compiled into two models."""
    if not optimizer_built(optimizer):  # also LossScaleOptimizer and legacy optimizers: no slot index
        return
    foreign = variables_not_built_for(optimizer, variables)
    if foreign:
        raise ValueError(
            f"The optimizer {optimizer.name!r} of model {model_name!r} was built for other variables "
            f"(another model's), not for {foreign[0]!r}: create one optimizer per model (compile each "
            "model with its own optimizer instance), and compile again with a new optimizer after "
            "changing which weights are trainable.")
