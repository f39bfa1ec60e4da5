"""A ``train_step`` that replaces the batch gradient by an aggregator's update
direction; ``compile``/``fit``, validation, callbacks and sample weights work as usual."""
from __future__ import annotations

import functools

from keras_coherence._functional import FunctionalWithExtras
from keras_coherence._keras import keras, tf
from keras_coherence.aggregation import aggregators as agg
from keras_coherence.coherence.engine import float32_trace, layer_group_grads, layer_per_example_grads
from keras_coherence.coherence.registry import var_key
from keras_coherence.coherence.rules.dense import DenseRule
from keras_coherence.coherence.step import (
    StepDirection, TracedBatch, in_replica_context, traced_train_step, traced_update,
)
from keras_coherence.coherence.tracing import is_graph_network
from keras_coherence.coherence.train_step import coherence_logs


def _group_bounds(local_batch, groups):
    """Contiguous groups over the *global* batch (sizes differ by at most one), as
    ``(start, end)`` in this replica's local indices, the global group sizes, and the
    scale from per-example gradients of Keras's loss to per-example gradients."""
    replicas = 1
    offset = tf.constant(0, tf.int32)
    total = local_batch
    if in_replica_context():
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync
        sizes = ctx.all_gather(tf.reshape(local_batch, [1]), axis=0)
        total = tf.reduce_sum(sizes)
        offset = tf.reduce_sum(sizes[: ctx.replica_id_in_sync_group])
    base, extra = total // groups, total % groups
    bounds, sizes = [], []
    start = tf.constant(0, tf.int32)
    for g in range(groups):
        size = base + tf.cast(g < extra, tf.int32)
        end = start + size
        bounds.append((tf.clip_by_value(start - offset, 0, local_batch),
                       tf.clip_by_value(end - offset, 0, local_batch)))
        sizes.append(size)
        start = end
    # Keras's loss is sum(w_i * loss_i) / (local batch * replicas): undo that scale.
    loss_scale = tf.cast(local_batch * replicas, tf.float32)
    return bounds, sizes, loss_scale, total


def _outer_factors(result, name):
    """``{kernel key: (a, dz)}`` when the layer's per-example kernel gradients are the
    outer products ``a_i (outer) dz_i`` (one call of a Dense layer on ``[batch, in]``
    inputs, no kernel quantizer): :meth:`Winsorized.reduce_outer` then never forms them."""
    traces = result.by_layer[name]
    if len(traces) != 1 or not isinstance(traces[0].rule, DenseRule):
        return {}
    trace = float32_trace(traces[0])
    a = trace.context.get("a")
    if a is None or a.shape.rank != 2 or trace.static.get("ste") is not None:
        return {}
    return {var_key(trace.layer.kernel): (a, result.cotangents[id(traces[0])][0])}


def aggregator_direction(batch: TracedBatch, aggregator, report_coherence=False,
                         per_layer=False) -> StepDirection:
    """The direction ``aggregator`` makes of the batch's per-example gradients, for the
    global batch (under ``tf.distribute`` its collectives combine the replicas); with
    ``report_coherence``, the batch's coherence statistics as logs."""
    result, variables = batch.result, batch.variables
    first_input = tf.nest.flatten(batch.x)[0]
    # A batch size known while tracing (a Python int) lets the aggregators refuse a
    # batch too small for them at once, with a ValueError, instead of at run time.
    local_batch = first_input.shape[0]
    if local_batch is None or in_replica_context():
        local_batch = tf.shape(first_input)[0]
    update = {}
    previous = []
    if aggregator.kind == "per_example":
        global_batch = local_batch
        if in_replica_context():
            global_batch = tf.distribute.get_replica_context().all_reduce("sum", local_batch)
        for name in result.by_layer:
            # One layer at a time: its per-example gradients are formed, reduced and
            # dropped before the next layer's, so peak memory is ~ batch x largest layer.
            with tf.control_dependencies(previous):
                per_example = layer_per_example_grads(result, name)
                outer = _outer_factors(result, name) if hasattr(aggregator, "reduce_outer") else {}
                for key, g in per_example.items():
                    if key in outer:  # unused per-example kernel gradients are pruned from the graph
                        update[key] = aggregator.reduce_outer(*outer[key], global_batch=global_batch)
                    else:
                        update[key] = aggregator.reduce(g, global_batch=global_batch)
            previous = [update[k] for k in per_example]
    elif aggregator.kind == "groups":
        bounds, sizes, loss_scale, total = _group_bounds(local_batch, aggregator.groups)
        # An empty group would enter the median as a zero mean: refuse such a batch.
        with tf.control_dependencies(aggregator.batch_checks(total)):
            for name in result.by_layer:
                sums = layer_group_grads(result, name, bounds)
                keys = list(sums[0])  # the layer's weight order: the same in every process
                sums = [[s[key] for key in keys] for s in sums]
                if in_replica_context():
                    # lists, not dicts keyed by id(variable): tf.nest orders a dict by its keys,
                    # and ids differ between the workers of a MultiWorkerMirroredStrategy
                    sums = tf.distribute.get_replica_context().all_reduce("sum", sums)
                for i, key in enumerate(keys):
                    means = [s[i] * loss_scale / tf.cast(n, s[i].dtype) for s, n in zip(sums, sizes)]
                    update[key] = aggregator.combine(means)  # on the scale of the mean gradient
    else:
        raise ValueError(f"Unknown aggregator kind {aggregator.kind!r}.")

    logs = {}
    if report_coherence:
        logs, _ = coherence_logs(result, variables, batch.x, batch.data_grads(), per_layer)
    return StepDirection([update.get(var_key(v)) for v in variables], logs)


def aggregated_train_step(model, data, aggregator, report_coherence=False, per_layer=False):
    """The update of one step of ``model`` on ``data`` whose direction is ``aggregator``'s.

    Returns ``(logs, y_pred, grads_and_vars)``; the gradients are already combined
    across replicas (apply them with ``skip_gradients_aggregation=True``).
    """
    return traced_update(model, data, functools.partial(
        aggregator_direction, aggregator=aggregator, report_coherence=report_coherence, per_layer=per_layer))


@keras.utils.register_keras_serializable(package="keras_coherence")
class AggregatedModel(FunctionalWithExtras):
    """A Functional model trained with a robust aggregator instead of the mean gradient.

    Wrap a model with :func:`with_aggregator`; then ``compile`` with any optimizer and
    ``fit`` as usual. ``report_coherence=True`` adds the batch's ``m_coherence`` and
    ``alpha`` to the logs.

    Example:
      >>> import numpy as np, keras_coherence as kc
      >>> base = kc.keras.Sequential([kc.keras.layers.Dense(3, input_shape=(4,))])
      >>> model = kc.aggregation.with_aggregator(base, "winsorized:c=2")
      >>> model.compile("sgd", kc.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      >>> h = model.fit(np.random.rand(32, 4), np.random.randint(0, 3, 32), batch_size=8, verbose=0)
      >>> model.aggregator
      Winsorized(c=2)
    """

    EXTRA_CONFIG = ("aggregator_spec", "report_coherence")

    def __init__(self, *args, aggregator_spec: str = "mean", report_coherence: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_graph_network(self):
            raise TypeError("AggregatedModel must be built as a Functional model: "
                            "AggregatedModel(inputs, outputs), or use with_aggregator(model, ...).")
        self.aggregator = agg.get(aggregator_spec)
        self.aggregator_spec = self.aggregator.spec()
        self.report_coherence = report_coherence

    def train_step(self, data):
        return traced_train_step(self, data, functools.partial(
            aggregator_direction, aggregator=self.aggregator, report_coherence=self.report_coherence))

    def make_train_function(self, force=False):
        """Keras's train function, re-raising a batch too small for the aggregator
        (found at run time, e.g. a short last batch) as a ValueError that says so."""
        function = super().make_train_function(force)
        if getattr(function, "_reraises_batch_errors", False):
            return function

        def train_function(iterator):
            try:
                return function(iterator)
            except tf.errors.InvalidArgumentError as err:
                message = agg.batch_error(err)
                if message is None:
                    raise
                raise ValueError(message) from None

        train_function._reraises_batch_errors = True
        self.train_function = train_function
        return train_function


def with_aggregator(model, aggregator="mean", report_coherence: bool = False) -> AggregatedModel:
    """An :class:`AggregatedModel` sharing ``model``'s layers and weights.

    ``aggregator`` is an :class:`~keras_coherence.aggregation.Aggregator` or a string
    such as ``"winsorized:c=4"`` or ``"m3"``.
    """
    if not is_graph_network(model):
        raise TypeError(f"with_aggregator needs a Sequential or Functional model; {model.name!r} "
                        "is subclassed. Rebuild it with the Functional API.")
    aggregator = agg.get(aggregator)
    return AggregatedModel(model.inputs, model.outputs, name=f"{model.name}_{aggregator.name}",
                           aggregator_spec=aggregator.spec(), report_coherence=report_coherence)
