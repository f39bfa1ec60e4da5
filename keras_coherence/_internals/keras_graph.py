"""The layer graph of a tf_keras Functional (or Sequential) model: walking it, asking who
feeds and who reads a layer, re-running it with other layer calls, and its config.

tf_keras 2.21 has no public API for any of this. The graph lives in private attributes of
``Functional`` (``_is_graph_network``, ``_nodes_by_depth``, ``_input_layers``,
``_nested_outputs``, ``_flatten_to_reference_inputs``, ``_conform_to_reference_input``) and
of ``Layer`` (``_inbound_nodes``); a ``Node`` (``tf_keras.src.engine.node``) names tensors by
``str(id(keras_tensor))`` and hands a call's arguments out of a dict of computed values with
``map_arguments``. Saving a Functional subclass with extra constructor arguments needs the
graph half of ``Functional.get_config`` / ``from_config`` (``tf_keras.src.engine.functional``).
Every walker of ours (the coherence engine's traced forward pass, BN folding and the QAT
annotation, the LiteRT rounding emulation, the binary memory model) goes through here.
"""
from keras_coherence._keras import keras, tf


def is_graph_network(layer) -> bool:
    """Whether ``layer`` is a Functional or Sequential model with a layer graph (built on
    known inputs), as opposed to a subclassed model, whose call is opaque."""
    return isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False)


def nodes_in_order(model):
    """``model``'s nodes (one per layer call, the input layers' nodes included), from the
    inputs to the outputs: deepest first, the order Keras runs them in."""
    for depth in sorted(model._nodes_by_depth, reverse=True):
        yield from model._nodes_by_depth[depth]


def output_ids(model):
    """The ids of ``model``'s output tensors, as nodes name tensors (``node.flat_output_ids``)."""
    return {str(id(t)) for t in model.outputs}


def consumers(model):
    """``{tensor id: [nodes of model that take that tensor as an input]}``."""
    out = {}
    for node in nodes_in_order(model):
        if node.is_input:
            continue
        for t in tf.nest.flatten(node.keras_inputs):
            out.setdefault(str(id(t)), []).append(node)
    return out


def consumer_layers(model):
    """``{layer name: (layers that read its outputs, whether one of them is a model output)}``
    over every layer ``model`` calls (a shared layer: over all its calls)."""
    readers = consumers(model)
    outputs = output_ids(model)
    out = {}
    for node in nodes_in_order(model):
        if node.is_input:
            continue
        users, is_output = out.setdefault(node.layer.name, ([], False))
        for t_id in node.flat_output_ids:
            users.extend(n.layer for n in readers.get(t_id, []))
            is_output = is_output or t_id in outputs
        out[node.layer.name] = (users, is_output)
    return out


def inbound_nodes(layer, model):
    """The nodes of ``layer`` (its calls) that are part of ``model``'s graph; a layer also
    called in another model has nodes there too."""
    nodes = {id(n) for n in nodes_in_order(model)}
    return [n for n in layer._inbound_nodes if id(n) in nodes]


def inbound_layers(layer):
    """The layers feeding ``layer``'s first call, as a list (``[]`` if it was never called)."""
    nodes = getattr(layer, "_inbound_nodes", [])
    if not nodes:
        return []
    inbound = nodes[0].inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def new_inputs_like(model):
    """Fresh ``keras.Input`` tensors with the shapes, dtypes and names of ``model``'s inputs."""
    return [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=layer.name)
            for t, layer in zip(model.inputs, model._input_layers)]


class _Reusable(list):
    """A computed value for ``Node.map_arguments``, which pops one copy per read (Keras
    stores as many copies as the tensor has readers): this one can be read any number of
    times."""

    def pop(self, *args):
        return self[0]


def rerun(model, inputs, call_layer):
    """Runs ``model``'s graph on ``inputs``, with ``call_layer(layer, args, kwargs)`` in place
    of each layer call, and returns the outputs in the model's output structure.

    What ``Functional.call`` does (``_run_internal_graph``): the inputs are matched to the
    model's ``keras.Input``s (a dict by name) and conformed to them (a trailing axis of 1
    added or dropped, the dtype cast), the nodes run deepest first, and a node whose inputs
    were not all computed is skipped. ``inputs`` may be tensors (a forward pass) or new
    ``keras.Input``s (``new_inputs_like``: the calls then build a new graph)."""
    computed = {}
    for ref, value in zip(model.inputs, model._flatten_to_reference_inputs(inputs)):
        computed[str(id(ref))] = _Reusable([model._conform_to_reference_input(value, ref_input=ref)])
    for node in nodes_in_order(model):
        if node.is_input:
            continue
        if any(t_id not in computed for t_id in node.flat_input_ids):
            continue
        args, kwargs = node.map_arguments(computed)
        outputs = call_layer(node.layer, args, kwargs)
        for t_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
            computed[t_id] = _Reusable([y])
    outputs = [computed[str(id(ref))][0] for ref in model.outputs]
    return tf.nest.pack_sequence_as(model._nested_outputs, outputs)


def functional_config(model):
    """The config ``Functional.get_config`` writes for ``model`` (name, trainable, layers and
    their connections, inputs, outputs), for a subclass that adds its own keys."""
    from tf_keras.src.engine import functional

    return functional.get_network_config(model, config={"name": model.name, "trainable": model.trainable})


def functional_from_config(config, custom_objects, build):
    """The model ``build(inputs, outputs)`` returns, on the graph rebuilt from a
    ``functional_config`` (as ``Functional.from_config`` does, layers that are not on the
    path from the inputs to the outputs reconnected)."""
    from tf_keras.src.engine import functional

    inputs, outputs, layers = functional.reconstruct_from_config(config, custom_objects)
    model = build(inputs, outputs)
    functional.connect_ancillary_layers(model, layers)
    return model
