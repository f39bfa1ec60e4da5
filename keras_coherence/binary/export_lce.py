"""Inference export of binary Keras/larq models with Larq Compute Engine (LCE).

LCE has no binary fully-connected kernel: a larq ``QuantDense`` exports as a float
``FULLY_CONNECTED`` holding ±1.0 floats. ``dense_as_conv1x1`` rewrites every binary
``QuantDense`` on a rank-2 input as ``Reshape([1, 1, F])`` → 1×1 ``QuantConv2D`` →
``Reshape([units])`` with the same weights and quantizers, which LCE turns into a
bit-packed ``LceBconv2d`` (batch norm after it is fused into the bconv's output
transform).

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

__all__ = ["dense_as_conv1x1", "to_lce", "to_float_tflite", "lce_predict", "lce_latency",
           "tflite_ops", "non_builtin_ops", "LceReport", "compare"]


def _larq():
    import larq

    return larq


def _is_binary_dense(layer):
    lq = _larq()
    if not isinstance(layer, lq.layers.QuantDense):
        return False
    precision = getattr(layer.kernel_quantizer, "precision", None)
    return precision == 1


def _conv1x1_block(layer):
    """``Reshape`` → 1×1 ``QuantConv2D`` → ``Reshape`` computing what ``layer`` computes."""
    lq = _larq()
    in_shape = layer.input_shape
    if len(in_shape) != 2:
        raise ValueError(
            f"dense_as_conv1x1 rewrites binary QuantDense layers on [batch, features] inputs; "
            f"{layer.name!r} gets {in_shape}. Flatten before it or write it as a 1x1 QuantConv2D yourself."
        )
    features = int(in_shape[-1])
    cfg = layer.get_config()
    conv = lq.layers.QuantConv2D(
        layer.units, 1,
        input_quantizer=cfg["input_quantizer"], kernel_quantizer=cfg["kernel_quantizer"],
        kernel_constraint=cfg["kernel_constraint"], use_bias=layer.use_bias,
        activation=cfg["activation"], name=layer.name + "_conv1x1",
    )
    block = keras.Sequential([
        keras.layers.Reshape((1, 1, features), name=layer.name + "_to_nhwc"),
        conv,
        keras.layers.Reshape((layer.units,), name=layer.name + "_to_nc"),
    ], name=layer.name)
    block.build((None, features))
    weights = layer.get_weights()
    weights[0] = weights[0].reshape(1, 1, features, layer.units)
    conv.set_weights(weights)
    return block


def dense_as_conv1x1(model):
    """A copy of ``model`` with each binary ``QuantDense`` written as a 1×1 ``QuantConv2D``.

    Binary means a 1-bit kernel quantizer (``ste_sign``, ``approx_sign``, ...); other
    layers are cloned with their weights. The copy computes the same outputs.

    Raises:
        ValueError: a binary ``QuantDense`` whose input is not ``[batch, features]``.
    """
    def clone(layer):
        if _is_binary_dense(layer):
            return _conv1x1_block(layer)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, copy.layers):
        if not _is_binary_dense(old):
            new.set_weights(old.get_weights())
    return copy


def to_lce(model, dense_as_conv=True):
    """LCE flatbuffer (``bytes``, float input and output) of a Keras/larq model.

    Args:
        model: a Keras 2 model with larq binary layers.
        dense_as_conv: rewrite binary ``QuantDense`` layers as 1×1 convolutions first
            (``dense_as_conv1x1``) so they become ``LceBconv2d``; without it they stay
            float ``FULLY_CONNECTED``.
    """
    import larq_compute_engine as lce

    if dense_as_conv:
        model = dense_as_conv1x1(model)
    return lce.convert_keras_model(model)


def to_float_tflite(model):
    """The same network as a float TFLite file (builtin ops, no optimizations)."""
    specs = [tf.TensorSpec([None] + t.shape.as_list()[1:], t.dtype) for t in model.inputs]
    serve = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function(*specs)], model)
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
    from ai_edge_litert import schema_py_generated as schema

    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
    model = schema.Model.GetRootAs(bytes(flatbuffer), 0)
    names = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        op = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if op == schema.BuiltinOperator.CUSTOM:
            names.add(code.CustomCode().decode())
        else:
            names.add(builtin_names[op])
    return sorted(names)


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
