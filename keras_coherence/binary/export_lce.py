"""Inference export of binary Keras/larq models with Larq Compute Engine (LCE).

LCE has no binary fully-connected kernel: a larq ``QuantDense`` exports as a float
``FULLY_CONNECTED`` holding ±1.0 floats. ``larq_inference_model`` rewrites every binary
dense layer on a rank-2 input (larq ``QuantDense`` or low-memory ``BinaryDense``) as
``Reshape([1, 1, F])`` → 1×1 ``QuantConv2D`` → ``Reshape([units])`` with the same
weights, which LCE turns into a bit-packed ``LceBconv2d`` (batch norm after it is
fused into the bconv's output transform), and the other low-memory layers
(``BinaryConv2D``, ``L1BatchNormalization``) into their larq / Keras inference
equivalents, so a model trained with :mod:`keras_coherence.binary.layers` (in Keras
or on the device) exports too.

* ``to_lce(model)``: the LCE flatbuffer (``bytes``) of the rewritten model.
* ``to_float_tflite(model)``: the same network as a plain float TFLite file (the
  size/latency reference: binary weights stored as ±1.0 floats).
* ``lce_predict`` / ``lce_latency``: run a file in LCE's own interpreter (the only
  one with the ``Lce*`` kernels; it runs float builtins too, so both files can be
  timed in one interpreter).
* ``tflite_ops`` / ``non_builtin_ops``: the op names a file uses, read from its
  flatbuffer (all subgraphs).
* ``compare(model, x)``: sizes, Keras ↔ LCE parity and latencies in one report.
"""
import dataclasses
import time

import numpy as np

from keras_coherence._keras import keras, tf
from keras_coherence._tflite import inference_function, opcode_names, variables_root

__all__ = ["larq_inference_model", "to_lce", "to_float_tflite", "lce_predict", "lce_latency",
           "tflite_ops", "non_builtin_ops", "LceReport", "compare", "check_lce_exportable",
           "LCE_SUPPORTED_LAYERS"]


def _larq():
    import larq

    return larq


def _binary_quant_dense(layer):
    lq = _larq()
    return (isinstance(layer, lq.layers.QuantDense)
            and getattr(layer.kernel_quantizer, "precision", None) == 1)


def _latent(layer, values):
    """A low-memory layer's weights as its inference pass sees them (float16-rounded
    when its method keeps float16 latent weights)."""
    from keras_coherence.binary import ops

    return [ops.round_latent(tf.constant(np.asarray(v, np.float32)), layer.config).numpy() for v in values]


def _quant_conv(filters, kernel_size, name, input_quantizer, kernel_quantizer="ste_sign", strides=1,
                padding="valid", use_bias=False, dilation_rate=1):
    return _larq().layers.QuantConv2D(
        filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
        dilation_rate=dilation_rate,
        input_quantizer=input_quantizer, kernel_quantizer=kernel_quantizer,
        kernel_constraint="weight_clip", name=name)


def _conv1x1_block(layer, weights, input_quantizer, kernel_quantizer="ste_sign"):
    """``Reshape`` → 1×1 ``QuantConv2D`` → ``Reshape``: a binary dense layer LCE can bconv.
    Returns ``(block, assign)``; ``assign()`` sets the weights once the block is built."""
    in_shape = layer.input_shape
    if len(in_shape) != 2:
        raise ValueError(
            f"binary dense layers are rewritten on [batch, features] inputs; {layer.name!r} gets "
            f"{in_shape}. Flatten before it or write it as a 1x1 binary convolution."
        )
    kernel, *bias = weights
    features, units = kernel.shape
    conv = _quant_conv(units, 1, layer.name + "_conv1x1", input_quantizer, kernel_quantizer, use_bias=bool(bias))
    # left unbuilt: clone_model loops forever on a nested model that already has a node
    block = keras.Sequential([
        keras.layers.Reshape((1, 1, features), name=layer.name + "_to_nhwc"),
        conv,
        keras.layers.Reshape((units,), name=layer.name + "_to_nc"),
    ], name=layer.name)
    return block, lambda: conv.set_weights([np.asarray(kernel).reshape(1, 1, features, units), *bias])


def _inference_layer(layer):
    """``(new layer, assign)`` replacing ``layer`` (``assign()`` sets its weights after
    cloning), or None to keep a copy of ``layer``."""
    from keras_coherence.binary import layers as bl

    if _binary_quant_dense(layer):
        cfg = layer.get_config()
        return _conv1x1_block(layer, layer.get_weights(), cfg["input_quantizer"], cfg["kernel_quantizer"])
    if isinstance(layer, bl.BinaryDense):
        return _conv1x1_block(layer, _latent(layer, layer.get_weights()), None if layer.first_layer else "ste_sign")
    if isinstance(layer, bl.BinaryConv2D):
        conv = _quant_conv(layer.filters, layer.kernel_size, layer.name,
                           None if layer.first_layer else "ste_sign", strides=layer.strides,
                           padding=layer.padding, dilation_rate=layer.dilation_rate)
        return conv, lambda: conv.set_weights(_latent(layer, layer.get_weights()))
    if isinstance(layer, bl.L1BatchNormalization):
        # (x - mu) / sigma + beta == gamma (x - mu) / sqrt(var + eps) + beta, gamma = 1/sigma, var = 1 - eps
        beta, mean, sigma = _latent(layer, [layer.beta.numpy(), layer.moving_mean.numpy(),
                                            layer.moving_sigma.numpy()])
        bn = keras.layers.BatchNormalization(epsilon=1e-3, name=layer.name)
        return bn, lambda: bn.set_weights([1.0 / sigma, beta, mean, np.full_like(sigma, 1.0 - bn.epsilon)])
    return None


#: The layers ``larq_inference_model`` / ``to_lce`` export (others raise ``ValueError``).
LCE_SUPPORTED_LAYERS = (
    "BinaryDense, BinaryConv2D, L1BatchNormalization, LowMemoryMaxPooling2D; larq QuantDense, "
    "QuantConv2D; Keras Dense, Conv2D, BatchNormalization, MaxPooling2D, AveragePooling2D, "
    "GlobalAveragePooling2D, Activation, ReLU, Add, Flatten, Reshape, Dropout")


def _lce_supported(layer):
    from keras_coherence.binary import layers as bl

    kl = keras.layers
    lq = _larq()
    return isinstance(layer, (
        bl.BinaryDense, bl.BinaryConv2D, bl.L1BatchNormalization, bl.LowMemoryMaxPooling2D,
        lq.layers.QuantDense, lq.layers.QuantConv2D, kl.InputLayer, kl.Dense, kl.Conv2D,
        kl.BatchNormalization, kl.MaxPooling2D, kl.AveragePooling2D, kl.GlobalAveragePooling2D,
        kl.Activation, kl.ReLU, kl.Add, kl.Flatten, kl.Reshape, kl.Dropout))


def check_lce_exportable(model):
    """Raises ``ValueError`` naming every layer of ``model`` outside
    :data:`LCE_SUPPORTED_LAYERS` (nested models, ``Lambda`` and other layers the rewrite
    does not know)."""
    bad = [layer for layer in model.layers if not _lce_supported(layer)]
    if bad:
        listed = ", ".join(f"{layer.name!r} ({type(layer).__name__})" for layer in bad)
        raise ValueError(f"{model.name!r} cannot be exported with LCE: unsupported layer(s) {listed}. "
                         f"Supported: {LCE_SUPPORTED_LAYERS}.")


def larq_inference_model(model):
    """A copy of ``model`` in the layers LCE converts to bit-packed kernels.

    * binary larq ``QuantDense`` and low-memory ``BinaryDense`` on ``[batch, features]``
      → ``Reshape([1, 1, F])`` → 1×1 ``QuantConv2D`` → ``Reshape([units])``
      (LCE has no binary fully-connected kernel);
    * ``BinaryConv2D`` → ``QuantConv2D`` (``ste_sign`` input unless a first layer);
    * ``L1BatchNormalization`` → ``BatchNormalization`` with ``γ = 1/σ₁`` (the moving
      statistics; float16-rounded as the low-memory inference pass rounds them);
    * every other layer is copied with its weights. The copy computes the same outputs.

    Raises:
        ValueError: a binary dense layer whose input is not ``[batch, features]``, or a
            layer outside :data:`LCE_SUPPORTED_LAYERS` (named in the message).
    """
    check_lce_exportable(model)
    assigns = {}

    def clone(layer):
        replacement = _inference_layer(layer)
        if replacement is None:
            return layer.__class__.from_config(layer.get_config())
        new, assigns[layer.name] = replacement
        return new

    copy = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, copy.layers):
        if old.name in assigns:
            assigns[old.name]()
        else:
            new.set_weights(old.get_weights())
    return copy


def to_lce(model):
    """LCE flatbuffer (``bytes``, float input and output) of ``larq_inference_model(model)``."""
    import larq_compute_engine as lce

    return lce.convert_keras_model(larq_inference_model(model))


def to_float_tflite(model):
    """The same network as a float TFLite file (builtin ops, no optimizations)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([inference_function(model)],
                                                                variables_root(model.variables))
    return converter.convert()


def _lce_interpreter(flatbuffer, num_threads=1):
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    return Interpreter(bytes(flatbuffer), num_threads=num_threads)


def lce_predict(flatbuffer, x, num_threads=1):
    """Outputs of a single-input model in LCE's interpreter (one example at a time)."""
    return np.asarray(_lce_interpreter(flatbuffer, num_threads).predict(np.asarray(x, np.float32)))


def lce_latency(flatbuffer, x, repeats=20, num_threads=1):
    """Median seconds per single-example inference in LCE's interpreter over ``repeats`` runs
    of ``x[:1]`` (after one warm-up run)."""
    interp = _lce_interpreter(flatbuffer, num_threads)
    one = np.asarray(x[:1], np.float32)
    interp.predict(one)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interp.predict(one)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def tflite_ops(flatbuffer):
    """The sorted names of the ops a TFLite file uses, over all its subgraphs
    (signatures included): builtin ops by their ``BuiltinOperator`` name, custom
    ops (``LceBconv2d``, ``FlexReluGrad``, ...) by their custom code."""
    return sorted(set(opcode_names(flatbuffer)))


def non_builtin_ops(flatbuffer):
    """The custom (non-builtin) ops of a TFLite file: Flex (select TF) ops, LCE ops, ..."""
    from ai_edge_litert import schema_py_generated as schema

    builtin = {k for k in vars(schema.BuiltinOperator) if k.isupper()} - {"CUSTOM"}
    return [name for name in tflite_ops(flatbuffer) if name not in builtin]


@dataclasses.dataclass
class LceReport:
    """What ``compare`` measured (sizes in bytes, latencies in seconds per example)."""

    lce_bytes: int
    float_bytes: int
    lce_ops: list
    max_abs_diff: float
    argmax_agreement: float
    lce_latency_s: float
    float_latency_s: float

    @property
    def size_ratio(self):
        return self.lce_bytes / self.float_bytes


def compare(model, x, repeats=20, lce_model=None):
    """Converts ``model`` with LCE and to float TFLite and compares them on ``x``.

    ``max_abs_diff`` and ``argmax_agreement`` compare LCE's outputs with
    ``model.predict``; both latencies are measured in LCE's interpreter (on x86 it
    uses reference kernels: compare within it, not with other interpreters).
    """
    lce_model = to_lce(model) if lce_model is None else lce_model
    float_model = to_float_tflite(model)
    x = np.asarray(x, np.float32)
    got = lce_predict(lce_model, x)
    want = model.predict(x, verbose=0)
    return LceReport(
        lce_bytes=len(lce_model),
        float_bytes=len(float_model),
        lce_ops=tflite_ops(lce_model),
        max_abs_diff=float(np.abs(got - want).max()),
        argmax_agreement=float(np.mean(got.argmax(-1) == want.argmax(-1))),
        lce_latency_s=lce_latency(lce_model, x, repeats),
        float_latency_s=lce_latency(float_model, x, repeats),
    )
