"""One backward pass that yields the batch gradient *and* every example's squared
gradient norm, per layer -- the core shared by gradient statistics, the coherence
``train_step`` and the robust aggregators."""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Dict, List

from keras_coherence._internals.keras_private import compiled_loss_weights, match_dtype_and_rank, unreduced_loss
from keras_coherence._keras import tf
from keras_coherence.coherence.registry import var_key
from keras_coherence.coherence.rules.fallback import FALLBACK
from keras_coherence.coherence.tracing import TracedForward


@dataclasses.dataclass
class BackwardResult:
    """``grads``: var_key -> batch-summed gradient of the objective (data part);
    ``layer_sq``: layer name -> per-example squared gradient norms ``[B]``;
    ``layer_vars``: layer name -> var keys of the layer's trainable weights;
    ``fallback_grads``: var_key -> tape gradient, for the fallback consistency check."""

    y_pred: object
    grads: Dict[int, object]
    layer_sq: Dict[str, tf.Tensor]
    layer_vars: Dict[str, List[int]]
    fallback_grads: Dict[int, object]
    fallback_layers: Dict[str, List[int]]
    by_layer: Dict[str, list] = dataclasses.field(default_factory=dict)  # name -> traces
    cotangents: Dict[int, list] = dataclasses.field(default_factory=dict)  # id(trace) -> dL/dwatched


def traced_backward(model, x, objective: Callable, mode: str, tape_extra=None,
                    loss_scaler=None) -> BackwardResult:
    """Run ``model`` on ``x`` with per-layer traces, differentiate ``objective(y_pred)``
    once, and apply each layer's rule.

    ``objective`` must be a sum (or a fixed multiple of a sum) of per-example terms for
    the per-example norms to mean per-example gradients.

    Mixed precision: the forward pass and the backward pass to the layers' outputs run
    in the policy's compute dtype, on the loss scaled by ``loss_scaler`` (a
    ``LossScaleOptimizer``, or None) so that float16 cotangents do not underflow; the
    cotangents are then cast to float32 and unscaled, and every rule computes its
    gradients and per-example squared norms from float32 inputs (a float16 Gram product
    or squared norm would overflow at 65504).
    """
    forward = TracedForward(model, mode)
    with tf.GradientTape(persistent=tape_extra is not None) as tape:
        y_pred = forward(x)
        loss = objective(y_pred)
        if loss_scaler is not None:
            loss = loss_scaler.get_scaled_loss(loss)
        extra = tape_extra() if tape_extra is not None else None

    by_layer = collections.OrderedDict()
    for trace in forward.traces:
        by_layer.setdefault(forward.names[id(trace)], []).append(trace)

    fallback_vars = []
    for traces in by_layer.values():
        if traces[0].rule is FALLBACK:
            fallback_vars.extend(traces[0].layer.trainable_weights)
    owned = {var_key(v) for traces in by_layer.values() for v in traces[0].layer.trainable_weights}
    orphans = [v for v in model.trainable_variables if var_key(v) not in owned]

    watched = [t for trace in forward.traces for t in trace.watched]
    sources = watched + fallback_vars + orphans
    all_grads = [_float32(g) for g in
                 tape.gradient(loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)]
    if loss_scaler is not None:
        all_grads = loss_scaler.get_unscaled_gradients(all_grads)
    cotangents = all_grads[: len(watched)]
    tape_fallback = all_grads[len(watched): len(watched) + len(fallback_vars)]
    for v, g in zip(orphans, all_grads[len(watched) + len(fallback_vars):]):
        if g is not None and not _statically_zero(g):
            raise ValueError(
                f"Variable {v.name!r} is trainable but not owned by any layer of the model's "
                "graph, so its per-example gradients cannot be attributed; create it inside a "
                "layer (e.g. a custom Layer with add_weight)."
            )

    grads, layer_sq, layer_vars, fallback_layers = {}, collections.OrderedDict(), {}, {}
    pos = 0
    cot_by_trace = {}
    for trace in forward.traces:
        cot_by_trace[id(trace)] = cotangents[pos: pos + len(trace.watched)]
        pos += len(trace.watched)
    for name, traces in by_layer.items():
        layer = traces[0].layer
        keys = [var_key(v) for v in layer.trainable_weights]
        layer_vars[name] = keys
        if len(traces) == 1:
            result = traces[0].rule.backward(float32_trace(traces[0]), cot_by_trace[id(traces[0])])
            grads.update(result.sum_grads)
            layer_sq[name] = result.sq_norms
        else:  # shared layer: per-example gradients of every call, summed, then the norm
            per_call = [FALLBACK.per_example_list(t, cot_by_trace[id(t)]) for t in traces]
            summed = [tf.add_n(list(gs)) for gs in zip(*per_call)]
            for key, g in zip(keys, summed):
                grads[key] = tf.reduce_sum(g, 0)
            layer_sq[name] = tf.add_n([tf.reduce_sum(tf.square(tf.reshape(g, [tf.shape(g)[0], -1])), 1)
                                       for g in summed])
        if traces[0].rule is FALLBACK:
            fallback_layers[name] = keys
    fallback = {var_key(v): g for v, g in zip(fallback_vars, tape_fallback)}
    result = BackwardResult(y_pred, grads, layer_sq, layer_vars, fallback, fallback_layers,
                            by_layer, cot_by_trace)
    result.tape, result.extra = (tape, extra) if tape_extra is not None else (None, None)
    return result


def _float32(t):
    """A float16/bfloat16 tensor (or IndexedSlices) as float32; anything else as it is."""
    if isinstance(t, tf.IndexedSlices):
        return tf.IndexedSlices(_float32(t.values), t.indices, t.dense_shape)
    if isinstance(t, tf.Tensor) and t.dtype in (tf.float16, tf.bfloat16):  # float64 stays
        return tf.cast(t, tf.float32)
    return t


def float32_trace(trace):
    """``trace`` with its saved tensors in float32, for a rule's backward (mixed
    precision: the engine's cotangents are float32 too). The generic
    fallback re-runs the layer on its saved inputs, so they stay as the layer saw them."""
    if trace.rule is FALLBACK:
        return trace
    return dataclasses.replace(trace, context=tf.nest.map_structure(_float32, trace.context),
                               static=tf.nest.map_structure(_float32, trace.static))


def _statically_zero(g):
    value = tf.get_static_value(g)
    return value is not None and not value.any()


# ----------------------------------------------------------------------------- losses

def per_example_loss_fn(model):
    """``fn(y_true, y_pred, sample_weight) -> [B]``: the model's compiled loss for each
    example (losses over extra axes are averaged, as Keras does; output losses are
    combined with the compiled ``loss_weights``; the sample weight multiplies)."""
    loss = getattr(model, "loss", None)
    if loss is None:
        raise ValueError(
            f"Model {model.name!r} has no loss: call model.compile(loss=...) first "
            "(gradient statistics use the compiled loss, reduced per example)."
        )
    n_out = len(model.outputs) if getattr(model, "outputs", None) else 1
    names = getattr(model, "output_names", None) or [None] * n_out
    if isinstance(loss, dict):
        losses = [loss.get(n) for n in names]
    elif isinstance(loss, (list, tuple)):
        losses = list(loss)
    else:
        losses = [loss] * n_out
    weights = compiled_loss_weights(model)
    if weights is None:
        weights = [1.0] * n_out
    elif isinstance(weights, dict):
        weights = [weights.get(n, 1.0) for n in names]
    fns = [None if l is None else unreduced_loss(l) for l in losses]

    def fn(y_true, y_pred, sample_weight=None):
        y_true_flat = tf.nest.flatten(y_true) if n_out > 1 else [y_true]
        y_pred_flat = tf.nest.flatten(y_pred) if n_out > 1 else [y_pred]
        total = None
        for f, w, yt, yp in zip(fns, weights, y_true_flat, y_pred_flat):
            if f is None:
                continue
            yt, yp = match_dtype_and_rank(tf.convert_to_tensor(yt), yp)  # what compile() applies
            values = f(yt, yp)
            if values.shape.rank == 0:
                raise ValueError(
                    f"The loss {f!r} returned one value for the whole batch; per-example "
                    "gradients need a loss that returns one value per example (a Keras "
                    "Loss, or a function reducing only the last axis)."
                )
            if values.shape.rank > 1:
                values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
            values = tf.cast(values, "float32") * w
            total = values if total is None else total + values
        if sample_weight is not None:
            total = total * tf.reshape(tf.cast(sample_weight, total.dtype), [-1])
        return total

    return fn


def layer_per_example_grads(result: BackwardResult, name: str) -> Dict[int, tf.Tensor]:
    """Explicit per-example gradients ``{var_key: [B, ...]}`` of one layer (summed over
    its calls when the layer is shared; shared layers always take the fallback)."""
    total = {}
    for trace in result.by_layer[name]:
        try:
            part = trace.rule.per_example_grads(float32_trace(trace), result.cotangents[id(trace)])
        except NotImplementedError:
            raise TypeError(
                f"The rule {type(trace.rule).__name__} for layer {name!r} does not implement "
                "per_example_grads, which this aggregator needs; implement it in the rule."
            ) from None
        for key, g in part.items():
            total[key] = g if key not in total else total[key] + g
    return total


def _slice_batched(structure, start, end):
    return tf.nest.map_structure(
        lambda t: t[start:end] if isinstance(t, tf.Tensor) and t.shape.rank else t, structure)


def layer_group_grads(result: BackwardResult, name: str, bounds) -> List[Dict[int, tf.Tensor]]:
    """Gradient sums over contiguous groups of examples ``[(start, end), ...]`` of one
    layer, from the same single backward pass (each group's slice of the layer's
    inputs and cotangents through the layer's rule)."""
    out = [dict() for _ in bounds]
    for trace in result.by_layer[name]:
        cot = result.cotangents[id(trace)]
        rule = trace.rule if len(result.by_layer[name]) == 1 else FALLBACK
        for g, (start, end) in enumerate(bounds):
            sub = dataclasses.replace(trace, context=_slice_batched(trace.context, start, end))
            sub = float32_trace(sub)
            sums = rule.backward(sub, [c[start:end] for c in cot]).sum_grads
            for key, value in sums.items():
                value = tf.convert_to_tensor(value)
                out[g][key] = value if key not in out[g] else out[g][key] + value
    return out
