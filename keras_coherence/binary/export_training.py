"""On-device training export: a binary Keras model's train step as a builtin-only TFLite model.

Flex (select TF) ops do not run in the Python LiteRT interpreter, and autodiff's
backward ops for convolutions and fused batch norm (``Conv2DBackpropFilter``,
``FusedBatchNormGradV3``, ...) are Flex ops. The low-memory layers of
:mod:`keras_coherence.binary.layers` have hand-written backward passes
(:mod:`keras_coherence.binary.ops`) built from ops that lower to TFLite builtins, so
the *same Keras model* that ``fit`` trains also traces into a device training graph;
the loss (:func:`softmax_cross_entropy`) and the Adam update are written here with
builtin-lowering ops too.

``TrainingModule(model)`` is a ``tf.Module`` holding the model's variables plus the
Adam state, with four signatures:

* ``train(x, y) -> {"loss"}``: one step on a batch (float ``x``, int32 labels ``y``);
  the loss is the batch's before the update (as ``train_on_batch`` reports it);
* ``infer(x) -> {"logits"}``: ``model(x, training=False)``;
* ``get_weights() -> {name: tensor}``: the whole state (``state_names``);
* ``set_weights(**{name: tensor}) -> {"step"}``: writes it back.

State names are the Keras variable names with ``/`` and ``:`` replaced
(``fc_1/kernel:0`` → ``fc_1_kernel``), Adam's moments ``adam_m_<name>`` /
``adam_v_<name>`` and ``adam_step``. ``set_keras_weights(model, state)`` writes a
(device) state into any model of the same topology, and
:func:`keras_coherence.binary.export_lce.to_lce` turns that model into an LCE
inference file.

``to_training_tflite(module)`` saves the module as a SavedModel with those signatures and
converts it with ``TFLITE_BUILTINS`` only and resource variables enabled; when the
converter or the result needs a non-builtin op, ``ValueError`` names it.
"""
import os
import re
import tempfile
import types

import numpy as np

from keras_coherence._deprecation import deprecated_alias
from keras_coherence._keras import tf
from keras_coherence._tflite import variables_root
from keras_coherence.binary import ops
from keras_coherence.binary.export_lce import non_builtin_ops

__all__ = ["TrainingModule", "to_training_tflite", "state_name", "keras_state", "set_keras_weights",
           "softmax_cross_entropy", "check_trainable_on_device", "SUPPORTED_LAYERS"]

SIGNATURES = ("train", "infer", "get_weights", "set_weights")

#: Default im2col budget of one convolution in the training graph (see ``scratch_bytes``).
DEFAULT_SCRATCH_BYTES = 16 * 2 ** 20


def state_name(variable_name):
    """A signature-safe name for a Keras variable name (``fc_1/kernel:0`` → ``fc_1_kernel``)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", re.sub(r":\d+$", "", variable_name))


def keras_state(model):
    """``{state name: variable}`` of a Keras model (all its variables, trainable or not)."""
    out = {}
    for var in model.variables:
        name = state_name(var.name)
        if name in out:
            raise ValueError(f"two variables of {model.name!r} map to the state name {name!r}; "
                             "give the layers unique names")
        out[name] = var
    return out


def set_keras_weights(model, state):
    """Writes the model entries of a state (``{name: array}``, e.g. a device checkpoint or
    ``get_weights`` output) into a Keras model of the same topology; optimizer entries
    are ignored.

    Raises:
        ValueError: a model variable has no entry, or its shape differs.
    """
    variables = keras_state(model)
    missing = sorted(set(variables) - set(state))
    if missing:
        raise ValueError(f"the state has no values for {missing}")
    for name, var in variables.items():
        value = np.asarray(state[name], np.float32)
        if value.shape != tuple(var.shape):
            raise ValueError(f"{name}: state shape {value.shape} != model shape {tuple(var.shape)}")
        var.assign(value)
    return model


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of int ``labels``; backward ``(softmax - onehot) / batch``
    (autodiff of ``SparseSoftmaxCrossEntropyWithLogits`` is not a TFLite builtin)."""
    @tf.custom_gradient
    def op(logits):
        onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
        logp = logits - tf.reduce_logsumexp(logits, axis=-1, keepdims=True)
        batch = tf.cast(tf.shape(logits)[0], logits.dtype)
        loss = -tf.reduce_sum(onehot * logp) / batch

        def grad(dloss):
            return dloss * (tf.exp(logp) - onehot) / batch

        return loss, grad

    return op(logits)


#: What the training export supports (checked layer by layer by ``TrainingModule``).
SUPPORTED_LAYERS = (
    "BinaryDense, BinaryConv2D, L1BatchNormalization, LowMemoryMaxPooling2D (the low-memory "
    "layers); DeviceBatchNormalization, DeviceConv2D, DeviceReLU, DeviceMaxPooling2D, "
    "DeviceAveragePooling2D (real layers with a builtin-only backward); larq QuantDense and "
    "Keras Dense without activation; Keras BatchNormalization on [batch, features] inputs; "
    "Add, GlobalAveragePooling2D, Flatten, Reshape, a linear Activation")


def _activation_name(layer):
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def _training_support(layer):
    """None when ``layer``'s training step lowers to TFLite builtins, else why it does not."""
    from keras_coherence._keras import keras

    kl = keras.layers
    # layers with a hand-written backward declare it (``builtin_backward = True``)
    if getattr(layer, "builtin_backward", False) or isinstance(
            layer, (kl.InputLayer, kl.Flatten, kl.Reshape, kl.Add, kl.GlobalAveragePooling2D)):
        return None
    if isinstance(layer, (kl.Dense, kl.Activation)):  # larq's QuantDense is a Dense
        act = _activation_name(layer)
        return None if act == "linear" else (
            f"activation {act!r}: its autodiff gradient (e.g. ReluGrad) has no TFLite builtin")
    if isinstance(layer, kl.Conv2D):                  # larq's QuantConv2D too
        return ("autodiff's kernel gradient is Conv2DBackpropFilter (no TFLite builtin); "
                "BinaryConv2D has a builtin-only backward")
    if isinstance(layer, kl.BatchNormalization):
        if len(layer.input_shape) == 2:
            return None
        return ("on images it is a fused batch norm (FusedBatchNormV3/GradV3, no TFLite "
                "builtin); use L1BatchNormalization")
    if isinstance(layer, kl.MaxPooling2D):
        return ("autodiff's MaxPoolGrad has no TFLite builtin; LowMemoryMaxPooling2D (square, "
                "stride = pool size) has a builtin-only backward")
    if isinstance(layer, kl.AveragePooling2D):
        return "autodiff's AvgPoolGrad has no TFLite builtin"
    return "no rule: its backward is not known to lower to TFLite builtins"


def check_trainable_on_device(model):
    """Raises ``ValueError`` naming every layer of ``model`` whose training step does not
    lower to TFLite builtins (see :data:`SUPPORTED_LAYERS`), before a slow conversion."""
    bad = [(layer, why) for layer in model.layers
           for why in [_training_support(layer)] if why is not None]
    if bad:
        listed = "; ".join(f"{layer.name!r} ({type(layer).__name__}: {why})" for layer, why in bad)
        raise ValueError(
            f"{model.name!r} cannot be exported for on-device training: {listed}. Supported: "
            f"{SUPPORTED_LAYERS}. Build the model with method='low_memory', or "
            "method='standard_device' for the standard arithmetic (the binary model builders "
            "then use these layers).")


class TrainingModule(tf.Module):
    """The training state and signatures of a Keras model (see the module docstring).

    The update is Keras's Adam (``m ← β₁m + (1-β₁)g``, ``v ← β₂v + (1-β₂)g²``,
    ``w ← w - lr·sqrt(1-β₂ᵗ)/(1-β₁ᵗ)·m/(sqrt(v)+ε)``), as ``keras.optimizers.Adam``
    and :func:`keras_coherence.binary.training.make_optimizer` ``"adam"`` do.

    Args:
        model: a single-input Keras model producing logits, whose backward passes lower
            to builtins: only the layers of :data:`SUPPORTED_LAYERS` (others raise
            ``ValueError`` naming them; ``to_training_tflite`` reports any op that still does not).
        learning_rate, beta_1, beta_2, epsilon: Adam's.
        clip_binary_kernels: clip kernels marked ``precision == 1`` to [-1, 1] after
            each update (larq's ``weight_clip``); off by default, as in ``train_bnn``.
        batch_size: fixed batch size of ``train``, or None for any (``infer`` takes any).
            Models with convolutions need a fixed one: the filter gradient is a
            convolution whose channel axis is the batch.
        scratch_bytes: the largest im2col buffer one convolution of the training graph
            may need (LiteRT's ``CONV_2D`` allocates ``output pixels x batch x kh*kw*C_in``
            floats for a non-constant filter): larger batches are split into chunks
            (same arithmetic; the kernel gradient sums over the chunks). None: no split.
    """

    def __init__(self, model, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 clip_binary_kernels=False, batch_size=None, scratch_bytes=DEFAULT_SCRATCH_BYTES):
        super().__init__(name="binary_training")
        self.scratch_bytes = ops.scratch_budget(scratch_bytes).nbytes  # validates
        if len(model.inputs) != 1:
            raise ValueError(f"TrainingModule needs a single-input model; {model.name!r} has {len(model.inputs)}")
        check_trainable_on_device(model)
        # a plain holder: as an attribute of this tf.Module the Keras model would be tracked
        self._keras = types.SimpleNamespace(model=model)
        self._hyper = (float(learning_rate), float(beta_1), float(beta_2), float(epsilon))
        self._clip = bool(clip_binary_kernels)
        variables = keras_state(model)
        trainable = {id(v) for v in model.trainable_variables}
        self.trainable_names = [n for n, v in variables.items() if id(v) in trainable]
        slots = {}
        for name in self.trainable_names:
            var = variables[name]
            slots[f"adam_m_{name}"] = tf.Variable(tf.zeros(var.shape), name=f"adam_m_{name}")
            slots[f"adam_v_{name}"] = tf.Variable(tf.zeros(var.shape), name=f"adam_v_{name}")
        slots["adam_step"] = tf.Variable(0.0, name="adam_step")
        self.state = {**variables, **slots}
        self.state_names = list(self.state)
        self.tracked_variables = list(self.state.values())

        self.batch_size = batch_size
        features = model.inputs[0].shape.as_list()[1:]
        x_spec = tf.TensorSpec([batch_size] + features, tf.float32, name="x")
        y_spec = tf.TensorSpec([batch_size], tf.int32, name="y")
        self.train = tf.function(self._train, autograph=False, input_signature=[x_spec, y_spec])
        self.infer = tf.function(self._infer, autograph=False, input_signature=[tf.TensorSpec([None] + features, tf.float32, name="x")])
        self.get_weights = tf.function(self._get_weights, autograph=False, input_signature=[])
        set_specs = [tf.TensorSpec(self.state[n].shape, tf.float32, name=n) for n in self.state_names]
        self.set_weights = tf.function(self._set_weights, autograph=False, input_signature=set_specs)

    @property
    def model(self):
        return self._keras.model

    def _train(self, x, y):
        lr, beta_1, beta_2, epsilon = self._hyper
        s = self.state
        params = [s[n] for n in self.trainable_names]
        with ops.scratch_budget(self.scratch_bytes), tf.GradientTape() as tape:
            loss = softmax_cross_entropy(self.model(x, training=True), y)
            grads = tape.gradient(loss, params)
        step = s["adam_step"].assign_add(1.0)
        alpha = lr * tf.sqrt(1.0 - tf.pow(beta_2, step)) / (1.0 - tf.pow(beta_1, step))
        for name, var, g in zip(self.trainable_names, params, grads):
            if g is None:
                raise ValueError(f"{name} gets no gradient from the loss")
            # read the state once its gradient exists: a read with no input may be
            # scheduled first, and its copy then lives in the arena for the whole step
            with tf.control_dependencies([g]):
                m_old = s[f"adam_m_{name}"].read_value()
                v_old = s[f"adam_v_{name}"].read_value()
                w_old = var.read_value()
            m = s[f"adam_m_{name}"].assign(m_old + (g - m_old) * (1.0 - beta_1))
            v = s[f"adam_v_{name}"].assign(v_old + (tf.square(g) - v_old) * (1.0 - beta_2))
            new = w_old - m * alpha / (tf.sqrt(v) + epsilon)
            if self._clip and getattr(var, "precision", None) == 1:
                new = tf.clip_by_value(new, -1.0, 1.0)
            var.assign(new)
        return {"loss": loss}

    def _infer(self, x):
        return {"logits": self.model(x, training=False)}

    def _get_weights(self):
        return {n: tf.identity(self.state[n]) for n in self.state_names}

    def _set_weights(self, *values):
        for name, value in zip(self.state_names, values):
            self.state[name].assign(value)
        return {"step": tf.identity(self.state["adam_step"])}

    def signatures(self):
        return {name: getattr(self, name) for name in SIGNATURES}

    # numpy helpers ----------------------------------------------------
    def weights(self):
        """The state as ``{name: np.ndarray}``."""
        return {n: v.numpy() for n, v in self.state.items()}

    def assign(self, weights):
        """Sets the whole state (model and Adam) from ``{name: array}``; every name is required."""
        missing = sorted(set(self.state_names) - set(weights))
        if missing:
            raise ValueError(f"the weights lack {missing}")
        for n in self.state_names:
            self.state[n].assign(np.asarray(weights[n], np.float32).reshape(self.state[n].shape))


_UNSUPPORTED = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def to_training_tflite(module):
    """Builtin-only TFLite flatbuffer (``bytes``) with the module's four signatures.

    Raises:
        ValueError: the conversion needs a non-builtin op, named in the message (e.g.
            ``MaxPoolGrad``, autodiff's gradient of a Keras max pool), or the file uses one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "saved_model")
        signatures = {k: f.get_concrete_function() for k, f in module.signatures().items()}
        # the signatures' own gradients are not needed (and would be traced again)
        tf.saved_model.save(variables_root(module.tracked_variables), path, signatures=signatures,
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            flatbuffer = converter.convert()
        except Exception as err:  # ConverterError: its message lists the ops
            ops = sorted(set(_UNSUPPORTED.findall(str(err))))
            if not ops:
                raise
            hint = ""
            if "Conv2D" in ops and module.batch_size is None:
                hint = (" (a Conv2D whose filter is a tensor with an unknown dimension: the hand-written "
                        "convolution backward needs a fixed batch size, TrainingModule(model, batch_size=N))")
            raise ValueError(f"the training graph needs TF ops with no TFLite builtin: {ops}{hint}") from err
    extra = non_builtin_ops(flatbuffer)
    if extra:
        raise ValueError(f"the training model needs non-builtin ops {extra}; LiteRT cannot run them")
    return flatbuffer


to_tflite = deprecated_alias("keras_coherence.binary.export_training.to_tflite", to_training_tflite)
