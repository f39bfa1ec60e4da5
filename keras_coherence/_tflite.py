"""The one way this package hands traced functions to the TFLite converter, and reads the
converted file's operators back.

The converter (like ``tf.saved_model.save``) saves the object it is given as a
SavedModel first, and every ``tf.function`` reachable from that object is traced
again there: the save context is part of a function's cache key. Given a Keras
model, that means every layer's training and inference calls; given the
``TrainingModule``, its four signatures once more. So the object handed over holds
the variables and nothing else. Measured on the 8x8 BinaryNet training export
(2-core AMD EPYC): 55 s given the module, 22 s given :func:`variables_root`.

Reading back, :func:`tflite_operators` lists a file's ops from the flatbuffer itself, with the
schema module LiteRT ships (``ai_edge_litert.schema_py_generated``): the interpreter lists
its ops only through a private method.
"""
from typing import List, NamedTuple

from keras_coherence._keras import tf


def variables_root(variables):
    """A ``tf.Module`` holding only ``variables`` (a list): the trackable object to
    save, or to pass ``from_concrete_functions``, for functions that capture them."""
    root = tf.Module()
    root.held_variables = list(variables)
    return root


def inference_function(model):
    """``model(x, training=False)`` traced (no AutoGraph) as one concrete function
    with a free batch dimension."""
    specs = [tf.TensorSpec([None] + t.shape.as_list()[1:], t.dtype) for t in model.inputs]
    serve = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False), autograph=False)
    return serve.get_concrete_function(*specs)


# ------------------------------------------------------------ reading a file back

class TFLiteOp(NamedTuple):
    """One operator of a TFLite subgraph."""

    name: str  # the builtin operator's name (``CONV_2D``, ...) or a custom op's code
    inputs: List[int]  # tensor indices; -1 for an optional input left out
    outputs: List[int]


def _opcode_names(model, schema):
    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        op = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # files before 2.4 use the deprecated field
        names.append(code.CustomCode().decode() if op == schema.BuiltinOperator.CUSTOM else builtin[op])
    return names


def opcode_names(tflite_model):
    """The names of the operators a TFLite file declares (all its subgraphs'), as
    :class:`TFLiteOp` names them."""
    from ai_edge_litert import schema_py_generated as schema

    return _opcode_names(schema.Model.GetRootAs(bytes(tflite_model), 0), schema)


def tflite_operators(tflite_model, subgraph=0):
    """The operators of a TFLite file's subgraph (0: the main one) in execution order, as
    :class:`TFLiteOp`, read from the flatbuffer with LiteRT's schema module
    (``ai_edge_litert.schema_py_generated``). Without delegates these are the nodes a LiteRT
    interpreter runs, with the tensor indices its ``get_tensor_details`` uses."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytes(tflite_model), 0)
    names = _opcode_names(model, schema)
    graph = model.Subgraphs(subgraph)
    ops = []
    for j in range(graph.OperatorsLength()):
        op = graph.Operators(j)
        ops.append(TFLiteOp(names[op.OpcodeIndex()],
                            [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else [],
                            [int(i) for i in op.OutputsAsNumpy()] if op.OutputsLength() else []))
    return ops
