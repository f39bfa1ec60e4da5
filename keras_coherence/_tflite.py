"""The one way this package hands traced functions to the TFLite converter.

The converter (like ``tf.saved_model.save``) saves the object it is given as a
SavedModel first, and every ``tf.function`` reachable from that object is traced
again there: the save context is part of a function's cache key. Given a Keras
model, that means every layer's training and inference calls; given the
``TrainingModule``, its four signatures once more. So the object handed over holds
the variables and nothing else. Measured on the 8x8 BinaryNet training export
(2-core AMD EPYC): 55 s given the module, 22 s given :func:`variables_root`.
"""
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
