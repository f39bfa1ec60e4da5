"""On-device training export: a binary network's train step as a builtin-only TFLite model.

Flex (select TF) ops do not run in the Python LiteRT interpreter, and autodiff's
backward ops (``ReluGrad``, ``Conv2DBackpropFilter``, ...) are Flex ops. So every
backward pass here is written by hand with ``tf.custom_gradient`` from ops that lower
to TFLite builtins (matmul, sign/select, reductions), and so is the Adam update.

``TrainingModule(spec)`` is a ``tf.Module`` whose ``tf.Variable``s hold the whole
training state (latent float weights, batch-norm β and moving statistics, Adam
moments and step) with four signatures:

* ``train(x, y) -> {"loss"}``: one step on a batch (float ``x``, int32 labels ``y``);
* ``infer(x) -> {"logits"}``: inference with the moving statistics;
* ``get_weights() -> {name: tensor}``: the whole state (``state_names`` order);
* ``set_weights(**{name: tensor}) -> {"step"}``: writes it back.

``to_tflite(module)`` saves it as a SavedModel with those signatures and converts
it with ``TFLITE_BUILTINS`` only and resource variables enabled; a non-builtin op
raises ``ValueError`` naming it. The device side (``edge/``) runs the file with
``ai_edge_litert`` alone.

Model: the paper's binary MLP (Wang et al. 2021, §5.5): binary dense layers (sign
weights with latent float weights, STE clipped at 1; sign activations with STE,
the first layer's input kept real) each followed by an l1 batch norm (mean absolute
deviation, trainable β, no γ), the last one's output being the logits; softmax
cross-entropy; Adam with latent weights clipped to [-1, 1]. Only sign(x) and the
1-byte STE mask of each binary input are kept for the backward pass.

``to_keras(spec)`` builds the larq inference model computing what ``infer``
computes (binary ``QuantDense`` + ``BatchNormalization``), ``keras_weights`` maps a
``get_weights`` state onto it, and ``keras_coherence.binary.export_lce.to_lce``
turns it into an LCE model.
"""
import dataclasses
import os
import tempfile

import numpy as np

from keras_coherence._keras import keras, tf
from keras_coherence.binary.export_lce import non_builtin_ops

__all__ = ["BinaryMLP", "TrainingModule", "to_tflite", "to_keras", "keras_weights",
           "binary_dense", "l1_batch_norm", "softmax_cross_entropy"]


@dataclasses.dataclass(frozen=True)
class BinaryMLP:
    """A binary MLP: ``input_dim`` → ``hidden`` → ``num_classes`` (every layer binary dense + l1 BN).

    ``learning_rate`` and the Adam constants are those of the hand-written update;
    ``momentum`` is the batch-norm moving-statistics momentum; ``epsilon`` is added
    to the l1 scale (mean absolute deviation) so a constant channel cannot divide by 0.
    """

    input_dim: int
    hidden: tuple = (256, 256, 256, 256)
    num_classes: int = 10
    learning_rate: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.999
    adam_epsilon: float = 1e-7
    momentum: float = 0.9
    epsilon: float = 1e-5

    @property
    def layer_dims(self):
        dims = (self.input_dim,) + tuple(self.hidden) + (self.num_classes,)
        return list(zip(dims[:-1], dims[1:]))


# ------------------------------------------------------------ ops with hand-written backward passes
def _sign(x):
    """sign with sign(0) = +1 (larq's and LCE's convention)."""
    return tf.where(x >= 0, tf.ones_like(x), -tf.ones_like(x))


def binary_dense(x, kernel, binary_input=True):
    """``sign(x) @ sign(kernel)`` (``x`` itself when ``binary_input`` is False).

    Backward: ``dx = dz @ sign(kernel)ᵀ`` masked by ``|x| ≤ 1`` (STE), ``dkernel =
    sign(x)ᵀ @ dz`` masked by ``|kernel| ≤ 1``. Kept for it: ``sign(x)`` and a boolean mask.
    """
    @tf.custom_gradient
    def op(x, kernel):
        xb = _sign(x) if binary_input else x
        mask = tf.abs(x) <= 1.0 if binary_input else None
        wb = _sign(kernel)
        z = tf.matmul(xb, wb)

        def grad(dz):
            dx = tf.matmul(dz, wb, transpose_b=True)
            if binary_input:
                dx = tf.where(mask, dx, tf.zeros_like(dx))
            dw = tf.matmul(xb, dz, transpose_a=True)
            dw = tf.where(tf.abs(kernel) <= 1.0, dw, tf.zeros_like(dw))
            return dx, dw

        return z, grad

    return op(x, kernel)


def l1_batch_norm(z, beta, epsilon):
    """Training-mode l1 batch norm over axis 0: ``(z - μ) / σ₁ + β`` with ``σ₁ = mean|z - μ| + ε``.

    Returns ``(y, μ, σ₁)``. Backward (Wang et al.): with ``d̂ = dy / σ₁``,
    ``dz = d̂ - mean(d̂) - sign(ẑ) · mean(d̂ · sign(ẑ)) · mean|ẑ|``, ``dβ = Σ dy``;
    only ``sign(ẑ)`` and per-channel scalars are kept.
    """
    @tf.custom_gradient
    def op(z, beta):
        mu = tf.reduce_mean(z, axis=0)
        sigma = tf.reduce_mean(tf.abs(z - mu), axis=0) + epsilon
        zhat = (z - mu) / sigma
        zsign = _sign(zhat)
        zscale = tf.reduce_mean(tf.abs(zhat), axis=0)

        def grad(dy, dmu, dsigma):
            d = dy / sigma
            dz = d - tf.reduce_mean(d, axis=0) - zsign * tf.reduce_mean(d * zsign, axis=0) * zscale
            return dz, tf.reduce_sum(dy, axis=0)

        return (zhat + beta, mu, sigma), grad

    return op(z, beta)


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of int ``labels``; backward ``(softmax - onehot) / batch``."""
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


# ------------------------------------------------------------ the training module
class TrainingModule(tf.Module):
    """The training state and signatures of ``spec`` (see the module docstring).

    Args:
        spec: a ``BinaryMLP``.
        seed: initialization seed (latent weights ``N(0, 1/fan_in)`` clipped to [-1, 1]).
        batch_size: fixed batch size of ``train``/``infer``, or None for any.
    """

    def __init__(self, spec, seed=0, batch_size=None):
        super().__init__(name="binary_training")
        self.spec = spec
        rng = np.random.default_rng(seed)
        state = {}
        for i, (fan_in, units) in enumerate(spec.layer_dims):
            kernel = np.clip(rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_in, units)), -1, 1)
            state[f"l{i}_kernel"] = kernel
            state[f"l{i}_beta"] = np.zeros(units)
            state[f"l{i}_mean"] = np.zeros(units)
            state[f"l{i}_scale"] = np.ones(units)
        self.trainable_names = [n for n in state if n.endswith(("_kernel", "_beta"))]
        for name in self.trainable_names:
            state[f"adam_m_{name}"] = np.zeros_like(state[name])
            state[f"adam_v_{name}"] = np.zeros_like(state[name])
        state["adam_step"] = np.zeros(())
        self.state_names = list(state)
        self.state = {n: tf.Variable(np.asarray(v, np.float32), name=n) for n, v in state.items()}

        x_spec = tf.TensorSpec([batch_size, spec.input_dim], tf.float32, name="x")
        y_spec = tf.TensorSpec([batch_size], tf.int32, name="y")
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        set_specs = [tf.TensorSpec(self.state[n].shape, tf.float32, name=n) for n in self.state_names]
        self.set_weights = tf.function(self._set_weights, input_signature=set_specs)

    # forward ----------------------------------------------------------
    def logits(self, x, training):
        """Logits of ``x``; in training mode also the batch statistics ``[(μ, σ₁), ...]``."""
        s, h, stats = self.state, x, []
        for i in range(len(self.spec.layer_dims)):
            z = binary_dense(h, s[f"l{i}_kernel"], binary_input=i > 0)
            if training:
                h, mu, sigma = l1_batch_norm(z, s[f"l{i}_beta"], self.spec.epsilon)
                stats.append((mu, sigma))
            else:
                h = (z - s[f"l{i}_mean"]) / s[f"l{i}_scale"] + s[f"l{i}_beta"]
        return h, stats

    def _train(self, x, y):
        spec, s = self.spec, self.state
        params = [s[n] for n in self.trainable_names]
        with tf.GradientTape() as tape:
            logits, stats = self.logits(x, training=True)
            loss = softmax_cross_entropy(logits, y)
        grads = tape.gradient(loss, params)
        for i, (mu, sigma) in enumerate(stats):
            for name, value in ((f"l{i}_mean", mu), (f"l{i}_scale", sigma)):
                s[name].assign(spec.momentum * s[name] + (1.0 - spec.momentum) * value)
        step = s["adam_step"].assign_add(1.0)
        lr = spec.learning_rate * tf.sqrt(1.0 - tf.pow(spec.beta_2, step)) / (1.0 - tf.pow(spec.beta_1, step))
        for name, var, g in zip(self.trainable_names, params, grads):
            m = s[f"adam_m_{name}"].assign(spec.beta_1 * s[f"adam_m_{name}"] + (1.0 - spec.beta_1) * g)
            v = s[f"adam_v_{name}"].assign(spec.beta_2 * s[f"adam_v_{name}"] + (1.0 - spec.beta_2) * g * g)
            new = var - lr * m / (tf.sqrt(v) + spec.adam_epsilon)
            if name.endswith("_kernel"):
                new = tf.clip_by_value(new, -1.0, 1.0)
            var.assign(new)
        return {"loss": loss}

    def _infer(self, x):
        return {"logits": self.logits(x, training=False)[0]}

    def _get_weights(self):
        return {n: tf.identity(self.state[n]) for n in self.state_names}

    def _set_weights(self, *values):
        for name, value in zip(self.state_names, values):
            self.state[name].assign(value)
        return {"step": tf.identity(self.state["adam_step"])}

    def signatures(self):
        return {"train": self.train, "infer": self.infer,
                "get_weights": self.get_weights, "set_weights": self.set_weights}

    # numpy helpers ----------------------------------------------------
    def weights(self):
        """The state as ``{name: np.ndarray}``."""
        return {n: v.numpy() for n, v in self.state.items()}

    def assign(self, weights):
        """Sets the state from ``{name: array}`` (e.g. a device checkpoint); every name is required."""
        missing = set(self.state_names) - set(weights)
        if missing:
            raise ValueError(f"weights lack {sorted(missing)}")
        for n in self.state_names:
            self.state[n].assign(np.asarray(weights[n], np.float32).reshape(self.state[n].shape))


def to_tflite(module):
    """Builtin-only TFLite flatbuffer (``bytes``) with the module's four signatures.

    Raises:
        ValueError: the converted file uses a non-builtin op (named in the message).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "saved_model")
        signatures = {k: f.get_concrete_function() for k, f in module.signatures().items()}
        tf.saved_model.save(module, path, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        flatbuffer = converter.convert()
    extra = non_builtin_ops(flatbuffer)
    if extra:
        raise ValueError(f"the training model needs non-builtin ops {extra}; LiteRT cannot run them")
    return flatbuffer


# ------------------------------------------------------------ Keras / LCE side
def to_keras(spec):
    """The larq inference model computing what ``TrainingModule.infer`` computes.

    Layer ``l{i}`` is a binary ``QuantDense`` (``ste_sign`` kernel; ``ste_sign`` input
    except for the first layer) followed by ``BatchNormalization`` ``bn{i}`` whose
    γ / moving variance express the l1 scale (``keras_weights``).
    """
    import larq as lq

    layers = [keras.Input((spec.input_dim,))]
    for i, (_, units) in enumerate(spec.layer_dims):
        layers.append(lq.layers.QuantDense(
            units, use_bias=False, input_quantizer="ste_sign" if i > 0 else None,
            kernel_quantizer="ste_sign", kernel_constraint="weight_clip", name=f"l{i}"))
        layers.append(keras.layers.BatchNormalization(epsilon=spec.epsilon, name=f"bn{i}"))
    return keras.Sequential(layers, name="binary_mlp")


def keras_weights(model, weights):
    """Writes a ``get_weights`` state (``{name: array}``) into a ``to_keras`` model.

    The l1 batch norm ``(z - μ)/σ₁ + β`` becomes Keras's ``γ (z - μ)/sqrt(var + ε) + β``
    with ``γ = 1/σ₁`` and ``var = 1 - ε``.
    """
    i = 0
    while f"l{i}_kernel" in weights:
        model.get_layer(f"l{i}").set_weights([np.asarray(weights[f"l{i}_kernel"])])
        bn = model.get_layer(f"bn{i}")
        scale = np.asarray(weights[f"l{i}_scale"], np.float32)
        bn.set_weights([1.0 / scale, np.asarray(weights[f"l{i}_beta"]), np.asarray(weights[f"l{i}_mean"]),
                        np.full_like(scale, 1.0 - bn.epsilon)])
        i += 1
    return model
