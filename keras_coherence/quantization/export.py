"""Integer export of PO2 QAT models (``quantize_model``): TFLite and raw integer weights.

* ``to_integer_tflite(model)`` freezes the PO2 quantizers and converts the QAT model into a
  fully integer TFLite flatbuffer (int8 kernels; float input/output with
  QUANTIZE/DEQUANTIZE at the edges). Every PO2-quantized weight tensor then has a
  power-of-two scale per channel (Conv2D, DepthwiseConv2D) or per tensor (Dense),
  zero point 0, and integer values within ``±(2**(bits-1) - 1)`` (sub-8-bit weights
  live in the int8 container; TF 2.21 packs 4-bit ones as INT4 in the file).
* ``integer_weights(model)`` gives the same integers and exponents per layer, for
  hardware that is not TFLite.
* ``tflite_kernels`` / ``tflite_operators`` / ``run_tflite`` / ``litert_interpreter`` read a
  TFLite file back with LiteRT (``ai_edge_litert``).
"""
import contextlib
import dataclasses

import numpy as np

from keras_coherence._deprecation import deprecated_alias
from keras_coherence._keras import tf
from keras_coherence._tflite import inference_function, tflite_operators, variables_root
from keras_coherence.quantization import qat

__all__ = ["IntegerKernel", "integer_weights", "to_integer_tflite",
           "tflite_kernels", "tflite_operators", "tflite_output_step",
           "run_tflite", "litert_interpreter"]

_KINDS = {"dense": "dense", "conv": "conv2d", "depthwise": "depthwise_conv2d"}
_TFLITE_OPS = {"CONV_2D": "conv2d", "DEPTHWISE_CONV_2D": "depthwise_conv2d", "FULLY_CONNECTED": "dense"}


@dataclasses.dataclass
class IntegerKernel:
    """A PO2-quantized kernel: ``kernel = codes * 2**exponents`` (broadcast per channel).

    Attributes:
        name: the Keras layer name (a folded layer has its convolution's name).
        kind: ``"dense"``, ``"conv2d"`` or ``"depthwise_conv2d"``.
        codes: int8 codes in the Keras kernel layout (``[in, out]``, HWIO,
            ``[kh, kw, C, M]``), within ``±(2**(bits-1) - 1)``.
        exponents: int32, one per output channel (``per_channel``) or ``[e]``.
        bits: weight bits.
        per_channel: whether ``exponents`` has one entry per output channel.
        bias: float32 effective bias (a folded layer's folded bias), or None.
        folded: whether the kernel is a BN-folded kernel ``W * gamma / sqrt(var + eps)``.
    """

    name: str
    kind: str
    codes: np.ndarray
    exponents: np.ndarray
    bits: int
    per_channel: bool
    bias: object
    folded: bool

    @property
    def scales(self):
        """``2.0 ** exponents`` (float32, exact)."""
        return np.ldexp(np.float32(1.0), self.exponents).astype(np.float32)

    def _channel_scales(self):
        if self.kind == "depthwise_conv2d":
            return self.scales.reshape(self.codes.shape[2], self.codes.shape[3]) if self.per_channel else self.scales
        return self.scales

    def dequantized(self):
        """The float kernel ``codes * scale`` in the Keras layout (exact)."""
        return self.codes.astype(np.float32) * self._channel_scales()

    def tflite_layout(self):
        """``codes`` as TFLite stores the weights: FC ``[out, in]``, conv OHWI,
        depthwise ``[1, kh, kw, C*M]`` (the per-channel axis is 0, 0 and 3)."""
        if self.kind == "dense":
            return self.codes.T
        if self.kind == "conv2d":
            return np.transpose(self.codes, (3, 0, 1, 2))
        kh, kw, c, m = self.codes.shape
        return self.codes.reshape(1, kh, kw, c * m)


def _qat_kernels(model):
    kernels = qat.quantized_kernels(model)
    revived = [layer.name for layer in getattr(model, "layers", []) if _revived(layer)]
    if not kernels and revived:
        raise ValueError(
            f"{model.name!r} was loaded from a SavedModel without this package's classes: Keras revived "
            f"its layers ({', '.join(revived[:5])}{', ...' if len(revived) > 5 else ''}) as generic ones "
            "without the PO2 quantizers. Load it with keras_coherence.quantization.load_model(path) (or "
            "keras.models.load_model(path, custom_objects=keras_coherence.quantization.custom_objects())), "
            "or save the QAT model as a .keras file and load that"
        )
    if not kernels:
        raise ValueError(
            f"{model.name!r} has no PO2 kernel quantizers; build it with keras_coherence.quantization.quantize_model"
        )
    return kernels


def _revived(layer):
    """Whether Keras rebuilt ``layer`` from a SavedModel's functions (its class unknown
    at load time) instead of from its config."""
    return type(layer).__module__.endswith("saving.legacy.saved_model.load")


def integer_weights(model):
    """``{layer name: IntegerKernel}`` for every PO2-quantized kernel of a QAT model.

    Freezes the quantizers first (``freeze_quantizers``, as ``to_integer_tflite`` does), so
    the integers are exactly the ones the exported model and the Keras inference
    graph use.
    """
    kernels = _qat_kernels(model)
    qat.freeze_quantizers(model)
    out = {}
    for k in kernels:
        q, shape = k.quantizer, tuple(k.weight.shape)
        codes = q.integer_codes(k.weight, k.state).numpy().reshape(shape).astype(np.int8)
        exponents = q.exponent(k.state).numpy().reshape(-1).astype(np.int32)
        bias = k.bias()
        out[k.name] = IntegerKernel(
            name=k.name,
            kind=_KINDS[q.layout],
            codes=codes,
            exponents=exponents,
            bits=q.quantizer.bits,
            per_channel=q.quantizer.per_channel,
            bias=None if bias is None else np.asarray(bias.numpy(), np.float32),
            folded=q.folded,
        )
    return out


def _representative(data, rank):
    """A ``representative_dataset`` generator of single-example batches."""
    if callable(data):
        return data
    if isinstance(data, (np.ndarray, list, tuple)) and not all(np.all(np.isfinite(np.asarray(x, np.float32)))
                                                               for x in data):
        raise ValueError("to_integer_tflite: representative_data contains NaN or Inf; calibrate with finite samples")

    def gen():
        for x in data:
            x = np.asarray(x, np.float32)
            if not np.all(np.isfinite(x)):
                raise ValueError("to_integer_tflite: representative_data contains NaN or Inf; calibrate with finite "
                                 "samples (the converter would otherwise derive the ranges from them)")
            if x.ndim == rank - 1:
                x = x[None]
            for i in range(len(x)):
                yield [x[i:i + 1]]

    return gen


def to_integer_tflite(model, representative_data=None, allow_float_scales=False):
    """Integer TFLite flatbuffer (bytes) of a ``quantize_model`` QAT model.

    Freezes the PO2 quantizers (the exponents of the last training step, or a
    calibration for quantizers that never trained), then converts with
    ``optimizations=[tf.lite.Optimize.DEFAULT]``; each frozen kernel reaches the
    converter as ``fake_quant(w_q, -127 s, 127 s)`` (narrow range, 8 bits), so its
    int8 weights get the scale ``s`` and zero point 0. The result is checked to
    compute in integers only (float QUANTIZE / DEQUANTIZE at the input and output
    excepted): a float op raises ``ValueError`` instead of a half-float file. The
    file's weight tensors (CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED filters) are
    read back too: a scale that is not an exact power of two, or a zero point other
    than 0, raises ``ValueError`` naming the tensors (a BatchNormalization the
    converter folded into the weights, a kernel without a PO2 quantizer), unless
    ``allow_float_scales=True``.

    Args:
        model: a QAT model from ``quantize_model`` with 8-bit activations.
        representative_data: optional; an iterable of input samples (or batches),
            or a ``representative_dataset`` generator function, for tensors whose
            ranges the QAT model does not fix (not needed for ``quantize_model``
            models, whose every tensor has a fake-quant range). With it the
            converter is also restricted to ``TFLITE_BUILTINS_INT8``. Its samples
            must be finite (NaN / Inf raise ``ValueError``).
        allow_float_scales: accept weight tensors whose scales are not powers of two
            (see ``quantize_model(allow_float_scales=True)``).

    Returns:
        ``bytes``: the TFLite model (float input and output).
    """
    kernels = _qat_kernels(model)
    for wrapper in {id(k.wrapper): k.wrapper for k in kernels}.values():
        bits = getattr(wrapper.quantize_config, "activation_bits", 8)
        if bits != 8:
            raise ValueError(
                f"to_integer_tflite needs 8-bit activations (TFLite int8 kernels; the converter ignores a fake-quant's "
                f"num_bits), but {wrapper.layer.name} quantizes its activation to {bits} bits"
            )
    _check_finite_weights(model, kernels)
    qat.freeze_quantizers(model)
    tflite_model = _convert(model, kernels, representative_data)
    _check_integer(tflite_model)
    if not allow_float_scales:
        _check_po2_scales(tflite_model)
    return tflite_model


to_tflite = deprecated_alias("keras_coherence.quantization.to_tflite", to_integer_tflite)


def _check_finite_weights(model, kernels):
    """Raises ``ValueError`` naming the variables (and folded kernels) holding NaN or Inf."""
    bad = qat.nonfinite_variables(model)
    bad += [f"{k.name} (folded kernel)" for k in kernels
            if k.quantizer.folded and not np.all(np.isfinite(k.view().numpy()))]
    if bad:
        raise ValueError(
            "to_integer_tflite: " + ", ".join(bad) + " contain NaN or Inf (a diverged training run, or a "
            "BatchNormalization moving variance + epsilon <= 0); restore finite weights before exporting"
        )


def _is_po2(scales):
    """Elementwise: positive, finite, and an exact power of two (mantissa 0.5)."""
    scales = np.asarray(scales, np.float64)
    return np.isfinite(scales) & (scales > 0) & (np.frexp(scales)[0] == 0.5)


def _check_po2_scales(tflite_model):
    """Raises ``ValueError`` naming every weight tensor with a scale that is not an exact
    power of two or a zero point other than 0."""
    bad = []
    for k in tflite_kernels(tflite_model):
        scales, zero_points = k["scales"], k["zero_points"]
        problems = []
        if scales.size == 0:
            problems.append("no quantization scale (float weights)")
        elif not np.all(_is_po2(scales)):
            first = scales[~_is_po2(scales)][0]
            problems.append(f"{int(np.sum(~_is_po2(scales)))} of {scales.size} scales not powers of two "
                            f"(e.g. {float(first)!r})")
        if np.any(zero_points != 0):
            problems.append("zero point != 0")
        if problems:
            bad.append(f"{k['name']} ({k['op']}: {', '.join(problems)})")
    if bad:
        raise ValueError(
            "to_integer_tflite: the converted model's weight tensors must have power-of-two scales with zero point 0, "
            "but: " + "; ".join(bad) + ". Usually a BatchNormalization the converter folded into the weights "
            "(build the QAT model with quantize_model(fold_batchnorm=True) from a model whose BNs can be "
            "folded) or a kernel without a PO2 quantizer. Pass allow_float_scales=True to accept such scales."
        )


@contextlib.contextmanager
def _export_mode(kernels):
    """Each frozen PO2 quantizer returns its inference output as a constant
    (``PO2KernelQuantizer.export_values``) while the block runs."""
    for k in kernels:
        k.quantizer._export = k.quantizer.export_values(k.weight, k.state)
    try:
        yield
    finally:
        for k in kernels:
            k.quantizer._export = None


def _convert(model, kernels, representative_data):
    """Traces ``model(x, training=False)`` in export mode and converts it; the
    tracing stays in export mode throughout, the converter's own included."""
    with _export_mode(kernels):
        converter = tf.lite.TFLiteConverter.from_concrete_functions([inference_function(model)],
                                                                    variables_root(model.variables))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if representative_data is not None:
            # With calibration data the converter can be told to accept int8 kernels only.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.representative_dataset = _representative(representative_data, model.inputs[0].shape.rank)
        return converter.convert()


def _check_integer(tflite_model):
    """Raises ``ValueError`` if an op other than QUANTIZE / DEQUANTIZE computes in float."""
    details = {d["index"]: d for d in litert_interpreter(tflite_model).get_tensor_details()}
    floats = []
    for op in tflite_operators(tflite_model):
        if op.name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        tensors = [i for i in op.inputs + op.outputs if i >= 0]
        if any(np.dtype(details[i]["dtype"]) == np.float32 for i in tensors):
            floats.append(op.name)
    if floats:
        raise ValueError(
            "the converted model still computes in float: " + ", ".join(sorted(set(floats)))
            + ". Some tensors have no quantization range (a layer left in float, or a layer tfmot does not "
            "quantize); pass representative_data to calibrate them or quantize those layers."
        )


# ------------------------------------------------------------ reading back
_RESOLVERS = {"optimized": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}


def litert_interpreter(tflite_model, kernels="optimized", preserve_all_tensors=False):
    """A LiteRT interpreter of ``tflite_model`` (bytes) without delegates: ``kernels`` picks
    the optimized builtin CPU kernels or the reference ones (``BUILTIN_REF``);
    ``preserve_all_tensors`` keeps every intermediate tensor readable after ``invoke``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if kernels not in _RESOLVERS:
        raise ValueError(f"kernels={kernels!r}: expected one of {sorted(_RESOLVERS)}")
    return Interpreter(
        model_content=bytes(tflite_model),
        experimental_op_resolver_type=getattr(OpResolverType, _RESOLVERS[kernels]),
        experimental_preserve_all_tensors=preserve_all_tensors,
    )


def tflite_kernels(tflite_model):
    """The weight tensors of the CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops.

    Returns:
        A list (op order) of dicts: ``op`` (``"conv2d"``, ``"depthwise_conv2d"``,
        ``"dense"``), ``name`` (tensor name), ``values`` (the stored integers, as the
        interpreter returns them), ``dtype``, ``scales``, ``zero_points``,
        ``quantized_dimension``.
    """
    interp = litert_interpreter(tflite_model)
    interp.allocate_tensors()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    out = []
    for op in tflite_operators(tflite_model):
        kind = _TFLITE_OPS.get(op.name)
        if kind is None:
            continue
        idx = op.inputs[1]
        d = details[idx]
        qp = d["quantization_parameters"]
        out.append({
            "op": kind,
            "name": d["name"],
            "values": np.array(interp.get_tensor(idx)),
            "dtype": np.dtype(d["dtype"]),
            "scales": np.asarray(qp["scales"], np.float32),
            "zero_points": np.asarray(qp["zero_points"]),
            "quantized_dimension": int(qp["quantized_dimension"]),
        })
    return out


def tflite_output_step(tflite_model):
    """The quantization step of the model's (first) output: the scale of the int8 tensor
    that the final DEQUANTIZE turns into the float output, or None if the output is not
    dequantized from an integer tensor. Output differences divided by it count int8 steps."""
    interp = litert_interpreter(tflite_model)
    details = {d["index"]: d for d in interp.get_tensor_details()}
    output = interp.get_output_details()[0]["index"]
    for op in tflite_operators(tflite_model):
        if op.name == "DEQUANTIZE" and output in op.outputs:
            scale = details[op.inputs[0]]["quantization_parameters"]["scales"]
            return float(scale[0]) if len(scale) == 1 else None
    return None


def run_tflite(tflite_model, x, batch_size=256, kernels="optimized"):
    """Runs a single-input, single-output TFLite model on ``x`` with LiteRT (no delegates).

    ``kernels``: ``"optimized"`` (LiteRT's builtin CPU kernels) or ``"reference"``
    (``BUILTIN_REF``); they round some requantizations differently (``litert``).

    Returns:
        The float outputs, stacked (``len(x)`` rows).
    """
    interp = litert_interpreter(tflite_model, kernels)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    x = np.asarray(x, np.float32)
    results = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        interp.resize_tensor_input(inp["index"], chunk.shape)
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], chunk.astype(inp["dtype"]))
        interp.invoke()
        results.append(np.array(interp.get_tensor(out["index"])))
    return np.concatenate(results)
