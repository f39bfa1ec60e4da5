"""tf_keras internals (tf_keras 2.21) behind one function each: what a custom forward pass,
loss or optimizer needs to do exactly what Keras's own does.

The modules are under ``tf_keras.src`` (``mixed_precision.autocast_variable``,
``engine.compile_utils``, ``losses``, ``utils.tf_utils``); the attributes are underscored
ones of ``Layer``, ``Model``, ``Optimizer`` (the Keras 2 optimizer,
``tf_keras.src.optimizers.optimizer``) and ``MultiHeadAttention``, and the scratch graph's
name during output-shape inference.
"""
import copy

from keras_coherence._keras import keras, tf


# ----------------------------------------------------------------------------- layers

def autocast_variables(layer):
    """The scope in which tf_keras runs ``layer.call``: under a mixed-precision policy
    (``mixed_float16``/``mixed_bfloat16``) its float32 variables read as the layer's
    compute dtype, as Keras's own forward pass sees them. Outside it they read as
    float32, and a rule's forward would mix dtypes."""
    from tf_keras.src.mixed_precision.autocast_variable import enable_auto_cast_variables

    return enable_auto_cast_variables(layer._compute_dtype_object)


def in_output_shape_inference():
    """True while tf_keras builds a functional model and calls a layer only to learn its
    output's shape and dtype: the call runs in a throw-away graph that tf_keras names
    ``<layer name>_scratch_graph`` (``Layer._infer_output_signature`` and
    ``compute_output_shape``). What a layer computes there is discarded, so an
    expensive exact computation (a PO2 exponent search) may skip it there."""
    graph = tf.compat.v1.get_default_graph()
    return not tf.executing_eagerly() and graph.name.endswith("_scratch_graph")


def expects_training_arg(layer):
    """Whether ``layer.call`` takes a ``training`` argument (Keras then passes the mode)."""
    return getattr(layer, "_expects_training_arg", False)


def keras_mask(tensor):
    """The mask Keras attached to ``tensor`` (``_keras_mask``), or None."""
    return getattr(tensor, "_keras_mask", None)


def set_keras_mask(tensor, mask):
    """Attaches ``mask`` to ``tensor`` as a layer's ``__call__`` does, for the next layer."""
    tensor._keras_mask = mask


def clear_losses(model):
    """Drops the activity losses of ``model``'s previous call, as ``Model.__call__`` does
    before a forward pass."""
    if hasattr(model, "_clear_losses"):
        model._clear_losses()


def variable_losses(model):
    """The losses of ``model`` that are functions of its variables alone: weight
    regularizers and ``add_loss(callable)``, which Keras keeps as callables
    (``Layer._callable_losses``) and evaluates on each read of ``model.losses``. Not the
    losses a call adds from the tensors it sees (activity regularizers), which depend on
    the layers' outputs and so reach the gradients through them."""
    losses = []
    for layer in all_layers(model):
        for fn in layer._callable_losses:
            value = fn()
            if value is not None:
                losses.append(value)
    return losses


def all_layers(model):
    """``model`` and every layer in it, nested layers and models included, depth first."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def build_input_shape(layer):
    """The input shape ``layer`` was built for, or None if it is not built."""
    return getattr(layer, "_build_input_shape", None)


def own_trainable_weights(layer):
    """The list in which Keras keeps the trainable variables ``layer`` created itself (its
    sublayers' come after them in ``layer.trainable_weights``); changing it changes that
    order."""
    return layer._trainable_weights


# ----------------------------------------------------------------------------- MultiHeadAttention

def attention_built(layer):
    """Whether a ``MultiHeadAttention`` layer has created its projections (on its first call)."""
    return getattr(layer, "_built_from_signature", False)


def attention_projection(layer, name):
    """The ``query``, ``key``, ``value`` or ``output`` projection (an ``EinsumDense``) of a
    ``MultiHeadAttention`` layer, or None before its first call."""
    return getattr(layer, f"_{name}_dense", None)


def attention_mask(layer, query, value, key, attention_mask, use_causal_mask):
    """The attention mask ``MultiHeadAttention.call`` computes from its inputs' masks and
    arguments."""
    return layer._compute_attention_mask(query, value, key=key, attention_mask=attention_mask,
                                         use_causal_mask=use_causal_mask)


def attention(layer, query, key, value, mask, training):
    """``(attended values, attention scores)``: ``MultiHeadAttention``'s attention on the
    projected query, key and value (softmax, dropout in training)."""
    return layer._compute_attention(query, key, value, mask, training=training)


# ----------------------------------------------------------------------------- losses

def unreduced_loss(loss):
    """A Keras loss object for ``loss`` (a name, function or ``Loss``) that returns one
    value per example (reduction NONE)."""
    from tf_keras.src.losses import LossFunctionWrapper  # not exported by tf_keras.losses

    obj = keras.losses.get(loss)
    if isinstance(obj, keras.losses.Loss):
        obj = copy.copy(obj)
        obj.reduction = keras.losses.Reduction.NONE
        return obj
    if callable(obj):
        return LossFunctionWrapper(obj, reduction=keras.losses.Reduction.NONE)
    raise ValueError(f"Cannot use {loss!r} as a loss.")


def match_dtype_and_rank(y_true, y_pred):
    """``(y_true, y_pred)`` as ``compile()``'s loss container passes them to a loss:
    ``y_true`` cast to ``y_pred``'s dtype and given its rank where they differ by one."""
    from tf_keras.src.engine.compile_utils import match_dtype_and_rank as match

    y_true, y_pred, _ = match(y_true, y_pred, None)
    return y_true, y_pred


def compiled_loss_weights(model):
    """The ``loss_weights`` given to ``model.compile`` (a list, a dict by output name), or None."""
    return getattr(getattr(model, "compiled_loss", None), "_user_loss_weights", None)


# ----------------------------------------------------------------------------- optimizers

def can_jit_compile():
    """Whether XLA can compile here (Keras's own platform check, e.g. not on Apple silicon)."""
    from tf_keras.src.utils import tf_utils

    return tf_utils.can_jit_compile()


def variables_not_built_for(optimizer, variables):
    """Names of ``variables`` that the built Keras 2 ``optimizer`` has no slots for (it was
    built for another model's); updating them would fail with a bare ``KeyError``."""
    return [v.name for v in variables if optimizer._var_key(v) not in optimizer._index_dict]


def optimizer_built(optimizer):
    """Whether a Keras 2 ``optimizer`` has been built (its slot variables created)."""
    return getattr(optimizer, "_built", False)


def set_current_learning_rate(optimizer, step):
    """What ``Optimizer._compute_current_learning_rate`` does before an update, with the
    schedule evaluated at ``step()`` instead of the optimizer's ``iterations``: when
    ``optimizer``'s learning rate is a ``LearningRateSchedule``, its value there goes into
    the variable the optimizer's ``learning_rate`` reads (created on the first call)."""
    schedule = optimizer._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        value = tf.convert_to_tensor(schedule(step()))
        if hasattr(optimizer, "_current_learning_rate"):
            optimizer._current_learning_rate.assign(value)
        else:
            optimizer._current_learning_rate = tf.Variable(
                value, name="current_learning_rate", dtype=value.dtype, trainable=False)
