"""A forward pass over a Functional/Sequential model that exposes, for every layer with
trainable weights, what its per-layer rule needs (see ``registry``).

It mirrors Keras's own ``Functional._run_internal_graph`` node by node; nested
Functional models are walked recursively. A model that is not a graph network
(subclassed) is one opaque node, handled by the generic fallback.
"""
from __future__ import annotations

import collections
from typing import Dict, List

from keras_coherence._keras import autocast_variables, keras, tf
from keras_coherence.coherence import rules  # noqa: F401  (registers the rules)
from keras_coherence.coherence.registry import Trace, rule_for, warn_fallback
from keras_coherence.coherence.rules.fallback import FALLBACK

MODES = ("inference", "batch", "train")


def is_graph_network(layer) -> bool:
    return isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False)


def _count_calls(model, counts, multiplicity=1):
    """How many times each layer is called in one forward pass of ``model``."""
    if not is_graph_network(model):
        counts[id(model)] += multiplicity
        return counts
    for depth_nodes in model._nodes_by_depth.values():
        for node in depth_nodes:
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
        if hasattr(self.model, "_clear_losses"):
            self.model._clear_losses()  # activity losses of this pass only, as Model.__call__ does
        if is_graph_network(self.model):
            return self._run_graph(self.model, inputs, "")
        return self._call_layer(self.model, [inputs], {}, "")

    def _call_layer(self, layer, args, kwargs, prefix):
        if is_graph_network(layer):
            return self._run_graph(layer, args[0], prefix + layer.name + "/")
        if getattr(layer, "_expects_training_arg", False) and "training" not in kwargs:
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
            with autocast_variables(layer):
                out, trace = rule.forward(layer, args, rule_kwargs, self.mode)
            previous_mask = getattr(args[0], "_keras_mask", None) if args else None
            if getattr(layer, "supports_masking", False) or getattr(layer, "mask_zero", False):
                mask = layer.compute_mask(args[0], previous_mask)
                if mask is not None and isinstance(out, tf.Tensor):  # not on a tuple of outputs
                    out._keras_mask = mask
        self.names[id(trace)] = prefix + layer.name
        self.traces.append(trace)
        return out

    def _run_graph(self, model, inputs, prefix):
        inputs = model._flatten_to_reference_inputs(inputs)
        tensor_dict = {}
        usage = model._tensor_usage_count
        for ref, value in zip(model.inputs, inputs):
            value = model._conform_to_reference_input(value, ref_input=ref)
            tensor_dict[str(id(ref))] = [value] * usage[str(id(ref))]
        for depth in sorted(model._nodes_by_depth.keys(), reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                if any(t_id not in tensor_dict for t_id in node.flat_input_ids):
                    continue
                args, kwargs = node.map_arguments(tensor_dict)
                outputs = self._call_layer(node.layer, args, kwargs, prefix)
                for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    tensor_dict[x_id] = [y] * usage[x_id]
        outputs = [tensor_dict[str(id(ref))].pop() for ref in model.outputs]
        return tf.nest.pack_sequence_as(model._nested_outputs, outputs)
