"""A forward pass over a Functional/Sequential model that exposes, for every layer with
trainable weights, what its per-layer rule needs (see ``registry``).

It re-runs the model's graph node by node as Keras's own ``Functional.call`` does
(``keras_graph.rerun``); nested Functional models are walked recursively. A model that is
not a graph network (subclassed) is one opaque node, handled by the generic fallback.
"""
from __future__ import annotations

import collections
from typing import Dict, List

from keras_coherence._internals import keras_private
from keras_coherence._internals.keras_graph import is_graph_network, nodes_in_order, rerun
from keras_coherence._keras import tf
from keras_coherence.coherence import rules  # noqa: F401  (registers the rules)
from keras_coherence.coherence.registry import Trace, rule_for, warn_fallback
from keras_coherence.coherence.rules.fallback import FALLBACK

__all__ = ["MODES", "TracedForward", "is_graph_network"]

MODES = ("inference", "batch", "train")


def _count_calls(model, counts, multiplicity=1):
    """How many times each layer is called in one forward pass of ``model``."""
    if not is_graph_network(model):
        counts[id(model)] += multiplicity
        return counts
    for node in nodes_in_order(model):
        if node.is_input:
            continue
        if is_graph_network(node.layer):
            _count_calls(node.layer, counts, multiplicity)
        else:
            counts[id(node.layer)] += multiplicity
    return counts


class TracedForward:
    """One traced forward pass. ``traces`` lists a :class:`Trace` per call of a layer
    with trainable weights, named by layer (nested models as ``outer/inner``)."""

    def __init__(self, model, mode: str = "inference"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.training = mode == "train"
        self.traces: List[Trace] = []
        self.names: Dict[int, str] = {}
        self._calls = _count_calls(model, collections.Counter())

    def __call__(self, inputs):
        keras_private.clear_losses(self.model)  # activity losses of this pass only, as Model.__call__ does
        if is_graph_network(self.model):
            return self._run_graph(self.model, inputs, "")
        return self._call_layer(self.model, [inputs], {}, "")

    def _call_layer(self, layer, args, kwargs, prefix):
        if is_graph_network(layer):
            return self._run_graph(layer, args[0], prefix + layer.name + "/")
        if keras_private.expects_training_arg(layer) and "training" not in kwargs:
            kwargs = dict(kwargs, training=self.training)
        if not layer.trainable_weights:
            return layer(*args, **kwargs)
        if self._calls[id(layer)] > 1:
            rule, reason = None, "it is called more than once in the model"
        else:
            rule, reason = rule_for(layer)
        if rule is None:
            warn_fallback(layer, reason)
            rule = FALLBACK
            out, trace = rule.forward(layer, args, kwargs, self.mode)
        else:
            rule_kwargs = {k: v for k, v in kwargs.items() if k != "training"}
            with keras_private.autocast_variables(layer):
                out, trace = rule.forward(layer, args, rule_kwargs, self.mode)
            previous_mask = keras_private.keras_mask(args[0]) if args else None
            if getattr(layer, "supports_masking", False) or getattr(layer, "mask_zero", False):
                mask = layer.compute_mask(args[0], previous_mask)
                if mask is not None and isinstance(out, tf.Tensor):  # not on a tuple of outputs
                    keras_private.set_keras_mask(out, mask)
        self.names[id(trace)] = prefix + layer.name
        self.traces.append(trace)
        return out

    def _run_graph(self, model, inputs, prefix):
        return rerun(model, inputs, lambda layer, args, kwargs: self._call_layer(layer, args, kwargs, prefix))
