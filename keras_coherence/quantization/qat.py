"""Quantization-aware training (tfmot) with power-of-two (PO2) weight quantizers.

``quantize_model(model, bits=4, method="msqe")`` returns a tfmot QAT model:

1. BN folding (``fold_batchnorm=True``): every foldable Conv/DepthwiseConv + BN pair
   becomes one ``FoldedConv2D`` / ``FoldedDepthwiseConv2D`` (frozen statistics, see
   ``keras_coherence.quantization.folding``), so the PO2 quantizer sees the folded
   kernel and the exported scales stay powers of two.
2. Annotation: ``Dense`` (per-tensor), ``Conv2D`` and ``DepthwiseConv2D`` (per
   output channel unless ``per_channel=False``), folded or not, get a
   ``PO2QuantizeConfig``: a PO2 weight quantizer on the kernel (``PO2KernelQuantizer``)
   and tfmot's ``MovingAverageQuantizer`` (``activation_bits``, asymmetric) on the
   activation. Every other layer gets tfmot's default configuration for its type.
   Fake-quant placement follows what TFLite fuses: a layer whose output feeds only a
   ReLU / ReLU6 (or an unfolded BN, or a Concatenate) is not quantized at its output;
   the ReLU is. Layers tfmot does not support raise a ``ValueError`` listing them
   (``unsupported="float"`` leaves them in float instead).
3. ``tfmot.quantization.keras.quantize_apply`` with ``PO2QuantizeScheme`` (tfmot's
   input quantization and Concatenate handling, none of its Conv/BN/ReLU rewrites,
   which would override the PO2 configs).

Depthwise kernels ``[kh, kw, C, M]`` are quantized through the view
``[kh, kw, 1, C*M]`` so the per-channel axis is the last one, as TFLite lays them out
(``[1, kh, kw, C*M]``). In inference a frozen quantizer's output passes through
``fake_quant_with_min_max_vars(_per_channel)(w_q, -127 s, 127 s, num_bits=8,
narrow_range=True)``; ``w_q`` is already on the ``s`` grid, so this is the identity
in Keras and tells the TFLite converter the scale ``s`` (zero point 0).
"""
import numbers

import numpy as np
import tensorflow_model_optimization as tfmot

from keras_coherence._internals import keras_graph, tfmot_private
from keras_coherence._internals.keras_private import in_output_shape_inference
from keras_coherence._internals.tf_private import smart_cond
from keras_coherence._keras import keras, tf
from keras_coherence.quantization import folding
from keras_coherence.quantization import quantizers as _quantizers
from keras_coherence.quantization.base import PO2Quantizer
from keras_coherence.quantization.tfmot_adapter import TFMOTQuantizer
from keras_coherence.quantization import replica_ranges

replica_ranges.install()  # activation ranges over the global batch under tf.distribute

__all__ = [
    "METHODS",
    "PO2KernelQuantizer",
    "PO2QuantizeConfig",
    "PO2QuantizeScheme",
    "quantize_model",
    "quantize_scope",
    "custom_objects",
    "load_model",
    "quantized_kernels",
    "freeze_quantizers",
    "unfreeze_quantizers",
    "calibrate_activations",
]

_tq = tfmot.quantization.keras
_register = keras.utils.register_keras_serializable(package="keras_coherence")

METHODS = _quantizers.METHODS  # method names -> quantizer aliases (quantizers.register adds to it)
_LAYOUTS = ("dense", "conv", "depthwise")


# ------------------------------------------------------------ the quantizer
@_register
class PO2KernelQuantizer(TFMOTQuantizer):
    """``TFMOTQuantizer`` for a layer kernel, with the layout view and the export op.

    Args:
        quantizer: a ``PO2Quantizer`` (or alias / config); its ``per_channel`` applies
            to the last axis of the view.
        layout: ``"dense"`` / ``"conv"`` (the kernel itself) or ``"depthwise"``
            (``[kh, kw, C, M]`` viewed as ``[kh, kw, 1, C*M]``).

    A ``PO2QuantizeConfig`` binds folded layers' ``fold_kernel`` with ``bind_fold``:
    the view is then taken of the folded kernel.
    """

    def __init__(self, quantizer="msqe_po2", layout="conv"):
        super().__init__(quantizer)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self._fold = None
        # ``(w_q, s)`` as numpy arrays while ``to_integer_tflite`` traces the graph it converts.
        self._export = None

    def bind_fold(self, fold):
        self._fold = fold
        return self

    @property
    def folded(self):
        return self._fold is not None

    def view_shape(self, shape):
        shape = tf.TensorShape(shape)
        if self.layout == "depthwise":
            kh, kw, c, m = shape.as_list()
            return tf.TensorShape([kh, kw, 1, c * m])
        return shape

    def view(self, kernel):
        """The tensor the PO2 quantizer sees: the (folded) kernel in the view layout."""
        kernel = tf.convert_to_tensor(kernel)
        if self._fold is not None:
            kernel = self._fold(kernel)
        return tf.reshape(kernel, self.view_shape(kernel.shape))

    def build(self, tensor_shape, name, layer):
        return super().build(self.view_shape(tensor_shape), name, layer)

    @tf.autograph.experimental.do_not_convert  # plain TF code; autograph would only slow tracing
    def __call__(self, inputs, training, weights, **kwargs):
        if in_output_shape_inference():
            # tf_keras only wants the shape here; the exponent search's graph (both
            # training branches, in every clone quantize_model makes) took most of its time
            return tf.identity(inputs)
        if not isinstance(training, (bool, int)):  # tfmot passes Python bools; be safe with tensors
            return smart_cond(training, lambda: self(inputs, True, weights), lambda: self(inputs, False, weights))
        shape = tf.convert_to_tensor(inputs).shape
        if self._export is not None and not training:
            # Export: the frozen inference values as constants (see ``export_values``).
            wq, s = self._export
            return tf.reshape(self._fake_quant(tf.constant(wq), tf.constant(s)), shape)
        y = self.quantizer.quantize(self.view(inputs), training, weights)
        if not training:
            frozen = tf.convert_to_tensor(weights["frozen"]) > 0.5
            s = self.quantizer.scale(weights)
            y = tf.cond(frozen, lambda: self._fake_quant(y, s), lambda: tf.identity(y))
        return tf.reshape(y, shape)

    def export_values(self, kernel, weights):
        """``(w_q, s)``: the frozen quantizer's inference output for ``kernel`` (view
        layout) and its scale, as numpy arrays (eager).

        ``to_integer_tflite`` traces the model with these as constants: the converted graph is
        ``fake_quant(const w_q, -127 s, 127 s)`` per kernel, which holds the values the
        frozen Keras graph computes, without the exponent search that graph also
        contains (the converter would constant-fold it, several times slower).
        """
        wq = self.quantizer.quantize(self.view(kernel), False, weights)
        return wq.numpy(), self.quantizer.scale(weights).numpy()

    def _fake_quant(self, y, s):
        """Identity on ``y`` (already ``s * codes``): the FakeQuant op the TFLite
        converter reads the scale ``s`` from, with zero point 0. Applied in inference
        once the quantizer is frozen (before, the exponent used may not be the stored
        one)."""
        s = tf.reshape(s, [-1])
        if self.quantizer.per_channel:
            return tf.quantization.fake_quant_with_min_max_vars_per_channel(
                y, -127.0 * s, 127.0 * s, num_bits=8, narrow_range=True
            )
        return tf.quantization.fake_quant_with_min_max_vars(
            y, -127.0 * s[0], 127.0 * s[0], num_bits=8, narrow_range=True
        )

    def integer_codes(self, inputs, weights):
        """int8 codes of a kernel (stored exponent), in the view layout."""
        return self.quantizer.integer_codes(self.view(inputs), weights)

    def freeze(self, weights, inputs=None):
        """Freezes the exponent; ``inputs`` (the raw kernel) recalibrates it first."""
        self.quantizer.freeze(None if inputs is None else self.view(inputs), weights)

    def get_config(self):
        return {**super().get_config(), "layout": self.layout}

    @classmethod
    def from_config(cls, config):
        return cls(_quantizers.deserialize(config["quantizer"]), config.get("layout", "conv"))


# ---------------------------------------------------------------- the config
def _activation_quantizer(bits):
    return _tq.quantizers.MovingAverageQuantizer(num_bits=bits, per_axis=False, symmetric=False, narrow_range=False)


@_register
class PO2QuantizeConfig(_tq.QuantizeConfig):
    """tfmot ``QuantizeConfig``: PO2 kernel quantizer + 8-bit activation quantizer.

    Args:
        weight_attr: the kernel attribute (``"kernel"`` or ``"depthwise_kernel"``).
        layout: ``"dense"``, ``"conv"`` or ``"depthwise"`` (see ``PO2KernelQuantizer``).
        quantizer: a ``PO2Quantizer`` or its serialized config (``bits``,
            ``per_channel`` and the method's options).
        quantize_activation: fake-quantize the layer's activation output with
            tfmot's ``MovingAverageQuantizer``; ``False`` for a layer whose linear
            output feeds only a fused ReLU (the ReLU quantizes).
        activation_bits: bits of that activation quantizer.
        folded: the layer is a ``FoldedConv2D`` / ``FoldedDepthwiseConv2D``; the
            quantizer sees ``layer.fold_kernel(kernel)``.
    """

    def __init__(self, weight_attr="kernel", layout="conv", quantizer="msqe_po2", quantize_activation=True,
                 activation_bits=8, folded=False):
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.weight_attr = weight_attr
        self.layout = layout
        if not isinstance(quantizer, dict):
            quantizer = _quantizers.serialize(_quantizers.get(quantizer))
        self.quantizer = quantizer
        self.quantize_activation = bool(quantize_activation)
        self.activation_bits = int(activation_bits)
        self.folded = bool(folded)

    def kernel_quantizer(self, layer=None):
        """A fresh ``PO2KernelQuantizer`` (bound to ``layer``'s fold when folded)."""
        q = PO2KernelQuantizer(_quantizers.deserialize(self.quantizer), self.layout)
        if self.folded:
            if layer is None or not hasattr(layer, "fold_kernel"):
                raise ValueError(f"folded=True needs a folded layer, got {layer!r}")
            q.bind_fold(layer.fold_kernel)
        return q

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, self.weight_attr), self.kernel_quantizer(layer))]

    def get_activations_and_quantizers(self, layer):
        if not self.quantize_activation:
            return []
        return [(layer.activation, _activation_quantizer(self.activation_bits))]

    def set_quantize_weights(self, layer, quantize_weights):
        (kernel,) = quantize_weights
        if self.folded:
            layer.set_quantized_kernel(kernel)
        else:
            setattr(layer, self.weight_attr, kernel)

    def set_quantize_activations(self, layer, quantize_activations):
        if self.quantize_activation:
            (layer.activation,) = quantize_activations

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {
            "weight_attr": self.weight_attr,
            "layout": self.layout,
            "quantizer": self.quantizer,
            "quantize_activation": self.quantize_activation,
            "activation_bits": self.activation_bits,
            "folded": self.folded,
        }

    def __eq__(self, other):
        return type(other) is type(self) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = object.__hash__


# ---------------------------------------------------------------- the scheme
def _tfmot_defaults(activation_bits):
    """tfmot's defaults for ``activation_bits``: ``(registry, output-quantizing config
    factory, no-op config class, layout-transforms factory)``."""
    output_config, noop_config = tfmot_private.default_quantize_configs(activation_bits)
    if activation_bits == 8:
        defaults, kw = _tq.default_8bit, {}
        registry = defaults.Default8BitQuantizeRegistry()
        transforms = defaults.default_8bit_transforms
    else:
        defaults = _tq.experimental.default_n_bit
        kw = {"num_bits_weight": 8, "num_bits_activation": activation_bits}
        registry = defaults.DefaultNBitQuantizeRegistry(**kw)
        transforms = defaults.default_n_bit_transforms
    return (
        registry,
        output_config,
        noop_config,
        lambda: [transforms.InputLayerQuantize(**kw)] + [getattr(transforms, n)(**kw) for n in _CONCATS],
    )


_CONCATS = ("ConcatTransform6Inputs", "ConcatTransform5Inputs", "ConcatTransform4Inputs",
            "ConcatTransform3Inputs", "ConcatTransform")


class _PO2LayoutTransform(_tq.QuantizeLayoutTransform):
    def __init__(self, activation_bits):
        self.activation_bits = activation_bits

    def apply(self, model, layer_quantize_map):
        transforms = _tfmot_defaults(self.activation_bits)[3]()
        return _tq.graph_transformations.model_transformer.ModelTransformer(
            model, transforms, set(layer_quantize_map.keys()), layer_quantize_map
        ).transform()


class PO2QuantizeScheme(_tq.QuantizeScheme):
    """tfmot ``QuantizeScheme``: tfmot's default registry for the layers without a
    ``PO2QuantizeConfig``; only the input-quantization and Concatenate layout
    transforms (the default Conv/BN/ReLU transforms would replace the PO2 configs)."""

    def __init__(self, activation_bits=8):
        self.activation_bits = int(activation_bits)

    def get_layout_transformer(self):
        return _PO2LayoutTransform(self.activation_bits)

    def get_quantize_registry(self):
        return _tfmot_defaults(self.activation_bits)[0]


# ------------------------------------------------------------ annotation
class _LoadableQuantizeLayer(tfmot_private.QuantizeLayer):
    """tfmot's ``QuantizeLayer`` whose ``build`` runs once.

    tfmot's ``build`` never sets ``built``: loading a ``.keras`` file builds the layer
    from its saved ``build_config`` and then again when the model graph calls it, so
    the layer ends with two sets of range variables and the saved three do not load
    ("expected 5 variables, but received 3"). ``custom_objects()`` maps
    ``QuantizeLayer`` to this class; it computes exactly what tfmot's does.
    """

    def build(self, input_shape):
        if self.built:
            return
        super().build(input_shape)
        self.built = True


_LoadableQuantizeLayer.__name__ = _LoadableQuantizeLayer.__qualname__ = "QuantizeLayer"


def custom_objects():
    """``{name: class}`` that ``keras.models.load_model`` needs for a QAT model.

    tfmot's layers, quantizers and configs plus this package's, for
    ``keras.models.load_model(path, custom_objects=custom_objects())`` (``.keras``,
    HDF5 or SavedModel). Without it Keras cannot resolve tfmot's layers (it fails
    with ``TypeError: 'str' object is not callable`` on a ``.keras`` file).
    """
    objects = {}
    for group in _tq.quantize_scope().custom_objects:  # tfmot's layers, quantizers, configs
        objects.update(group)
    objects.update(_own_objects())
    return objects


def _own_objects():
    return {
        "QuantizeLayer": _LoadableQuantizeLayer,
        "PO2KernelQuantizer": PO2KernelQuantizer,
        "PO2QuantizeConfig": PO2QuantizeConfig,
        "TFMOTQuantizer": TFMOTQuantizer,
        "FoldedConv2D": folding.FoldedConv2D,
        "FoldedDepthwiseConv2D": folding.FoldedDepthwiseConv2D,
        "MSQEPo2Baseline": _quantizers.MSQEPo2Baseline,
        "MSQEPo2": _quantizers.MSQEPo2,
        "LearnedPo2": _quantizers.LearnedPo2,
    }


def quantize_scope(*args):
    """A ``keras.utils.custom_object_scope`` holding ``custom_objects()`` (and any
    ``{name: class}`` dicts in ``args``), under which ``keras.models.load_model``
    loads a QAT model. Use it instead of ``tfmot.quantization.keras.quantize_scope``,
    which lacks this package's classes and tfmot's ``QuantizeLayer`` fix."""
    return keras.utils.custom_object_scope(custom_objects(), *args)


def load_model(filepath, compile=True, **kwargs):
    """``keras.models.load_model`` of a saved QAT model under ``quantize_scope()``.

    ``.keras``, HDF5 and SavedModel restore every variable (kernels, PO2 exponents,
    learned scales, second moments, activation ranges) and the same predictions.
    (Loaded without these custom objects, a SavedModel directory comes back as generic
    revived layers without the PO2 quantizers, on which ``to_integer_tflite`` and
    ``integer_weights`` raise.)
    """
    with quantize_scope():
        return keras.models.load_model(filepath, compile=compile, **kwargs)


def _kernel_kind(layer):
    """``(weight_attr, layout, folded)`` for a layer the PO2 configs handle, else None."""
    t = type(layer)
    if t is folding.FoldedConv2D:
        return "kernel", "conv", True
    if t is folding.FoldedDepthwiseConv2D:
        return "depthwise_kernel", "depthwise", True
    if t is keras.layers.Dense:
        return "kernel", "dense", False
    if t is keras.layers.Conv2D:
        return "kernel", "conv", False
    if t is keras.layers.DepthwiseConv2D:
        return "depthwise_kernel", "depthwise", False
    return None


def _has_kernel(layer):
    return any(getattr(layer, attr, None) is not None for attr in ("kernel", "depthwise_kernel", "pointwise_kernel"))


def _fused_relu(layer):
    """Whether TFLite fuses ``layer`` into the op before it (RELU / RELU6)."""
    if type(layer) is keras.layers.ReLU:
        max_value = None if layer.max_value is None else float(layer.max_value)
        return float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0 and max_value in (None, 6.0)
    if type(layer) is keras.layers.Activation:
        return getattr(layer.activation, "__name__", None) in ("relu", "relu6")
    return False


def _quantizer_template(method, bits, options):
    if isinstance(method, PO2Quantizer):
        config = _quantizers.serialize(method)
    elif isinstance(method, dict):
        config = _quantizers.serialize(_quantizers.deserialize(method))
    elif isinstance(method, str):
        config = _quantizers.serialize(_quantizers.get(METHODS.lookup(method)))
    else:
        raise ValueError(f"method must be a name, a PO2Quantizer or a config dict, got {method!r}")
    config = dict(config)
    config["config"] = {**config["config"], **dict(options or {}), "bits": bits}
    _quantizers.deserialize(config)  # validates bits and options now
    return config


def _layer_quantizer(template, per_channel, name):
    config = dict(template)
    inner = {k: v for k, v in template["config"].items() if k not in ("name", "trainable", "dtype")}
    config["config"] = {**inner, "per_channel": bool(per_channel), "channel_axis": -1, "name": f"{name}_po2"}
    return config


_SUPPORTED = ("Dense, Conv2D and DepthwiseConv2D (PO2 weights; a BatchNormalization after a convolution is "
              "folded into it) and the weightless layers tfmot quantizes (ReLU, Add, Concatenate, pooling, "
              "Flatten, Reshape, Dropout, ...)")


def annotate(model, bits=4, method="msqe", per_channel=True, activation_bits=8, unsupported="raise",
             quantizer_options=None, allow_float_scales=False):
    """``(annotated model, {layer name: QuantizeConfig or None})`` for ``quantize_apply``.

    The annotated model shares ``model``'s layers (as tfmot's
    ``quantize_annotate_model`` does); ``quantize_model`` calls it on a private copy.
    """
    if unsupported not in ("raise", "float"):
        raise ValueError(f"unsupported must be 'raise' or 'float', got {unsupported!r}")
    template = _quantizer_template(method, bits, quantizer_options)
    registry, output_config, noop_config, _ = _tfmot_defaults(activation_bits)
    usage = keras_graph.consumer_layers(model)
    configs, bad, float_kernels = {}, [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        users, is_output = usage.get(layer.name, ([], False))
        only = (lambda pred: bool(users) and not is_output and all(pred(u) for u in users))
        kind = _kernel_kind(layer)
        if kind is not None:
            weight_attr, layout, folded = kind
            linear = getattr(layer.activation, "__name__", None) == "linear"
            feeds_fused = only(lambda u: _fused_relu(u) or isinstance(
                u, (keras.layers.BatchNormalization, keras.layers.Concatenate)))
            configs[layer.name] = PO2QuantizeConfig(
                weight_attr=weight_attr,
                layout=layout,
                quantizer=_layer_quantizer(template, per_channel and layout != "dense", layer.name),
                quantize_activation=not (linear and feeds_fused),
                activation_bits=activation_bits,
                folded=folded,
            )
        elif type(layer) is keras.layers.BatchNormalization:
            configs[layer.name] = noop_config() if only(_fused_relu) else output_config()
        elif type(layer) is keras.layers.Add and only(_fused_relu):
            configs[layer.name] = noop_config()
        elif not isinstance(layer, keras.Model) and registry.supports(layer):
            if _has_kernel(layer) and not allow_float_scales:
                float_kernels.append(f"{layer.name} ({type(layer).__name__})")
            configs[layer.name] = None
        elif isinstance(layer, keras.Model) and unsupported == "raise":
            bad.append(f"{layer.name} (a nested {type(layer).__name__} model: rebuild the outer model from "
                       "its layers so that every layer is at the top level)")
        elif unsupported == "raise":
            bad.append(f"{layer.name} ({type(layer).__name__})")
    if bad:
        raise ValueError(
            "quantize_model cannot quantize these layers: " + ", ".join(bad) + f". Supported: {_SUPPORTED}. "
            "Pass unsupported='float' to leave other layers in float (the TFLite file is then not fully "
            "integer), or replace them with supported layers."
        )
    if float_kernels:
        raise ValueError(
            "quantize_model has no PO2 quantizer for the weights of: " + ", ".join(float_kernels)
            + ". tfmot would quantize them with float (non power-of-two) scales. PO2 weights: Dense, "
            "Conv2D and DepthwiseConv2D; replace those layers (a SeparableConv2D is a DepthwiseConv2D "
            "followed by a 1x1 Conv2D) or pass allow_float_scales=True to accept tfmot's 8-bit float scales."
        )

    def wrap(layer):
        if layer.name in configs:
            return _tq.quantize_annotate_layer(layer, configs[layer.name])
        return layer

    annotated = folding.rebuild_functional(
        model, replace={layer.name: wrap(layer) for layer in model.layers if layer.name in configs},
        copy_layers=False,
    )
    return annotated, configs


# ------------------------------------------------------------- public API
def _check_bits(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 2 <= int(value) <= 8:
        raise ValueError(f"{name} must be an integer in 2..8, got {value!r}")
    return int(value)


def quantize_model(model, bits=4, method="msqe", per_channel=True, fold_batchnorm=True, activation_bits=8,
                   unsupported="raise", update_bn_statistics=False, quantizer_options=None, calibration_data=None,
                   allow_float_scales=False):
    """A tfmot QAT model with PO2 weight quantizers (see the module docstring).

    Args:
        model: a Functional or Sequential ``keras.Model`` (float, possibly trained;
            its weights are copied, the model itself is not modified).
        bits: weight bits, 2..8 (codes ``-(2**(bits-1)-1) .. 2**(bits-1)-1``).
        method: ``"msqe"`` (``MSQEPo2``), ``"msqe_baseline"`` (``MSQEPo2Baseline``,
            QKeras auto_po2), ``"learned"`` (``LearnedPo2``), a registry alias, or a
            ``PO2Quantizer`` / config used as a template (its ``bits``,
            ``per_channel`` and ``channel_axis`` are replaced). Per channel, a 3x3
            depthwise kernel has 9 weights per exponent; ``MSQEPo2`` applies its
            2-sigma outlier mask only to groups of at least ``outlier_min_size``
            (16) weights, since masking there drops each channel's dominant tap.
        per_channel: one exponent per output channel for Conv2D / DepthwiseConv2D
            (Dense kernels are always per-tensor: the TFLite converter rejects
            per-channel fully-connected weights).
        fold_batchnorm: fold Conv/DepthwiseConv + BN pairs first (needed for PO2
            scales in the TFLite file: the converter folds a remaining BN into the
            weight scales).
        activation_bits: bits of tfmot's activation quantizers (``to_integer_tflite`` needs 8).
        unsupported: ``"raise"`` (default) or ``"float"`` for layers tfmot cannot quantize.
        update_bn_statistics: folded layers update their moving statistics in training.
        quantizer_options: extra keyword arguments of the PO2 quantizer class.
        allow_float_scales: accept weights whose exported scales will not be powers
            of two: a BatchNormalization after a Dense / Conv2D / DepthwiseConv2D
            that is not folded (``fold_batchnorm=False``, or a pair
            ``folding.unfoldable_pairs`` lists; the converter folds it into the
            weight scales) and kernel layers without a PO2 quantizer (tfmot's 8-bit
            default, e.g. ``Conv1D``). Default ``False``: those raise ``ValueError``
            naming the layers. Pass the same flag to ``to_integer_tflite``.
        calibration_data: optional input batch for ``calibrate_activations``.
            tfmot starts every activation range at [-6, 6] (the input's at [0, 0])
            and moves it by an EMA with decay 0.999, so without calibration a
            trained float model's activations saturate for the first thousands of
            QAT steps.

    Returns:
        A new, uncompiled ``keras.Model`` of ``QuantizeWrapperV2`` layers.
    """
    bits = _check_bits("bits", bits)
    activation_bits = _check_bits("activation_bits", activation_bits)
    folding._check_graph_model(model, "quantize_model")
    nonfinite = nonfinite_variables(model)
    if nonfinite:
        raise ValueError("quantize_model: the float model's weights " + ", ".join(nonfinite) + " contain NaN "
                         "or Inf; quantize a model with finite weights (the PO2 exponents would be undefined)")
    if not allow_float_scales:
        _check_batchnorms_foldable(model, fold_batchnorm)
    if fold_batchnorm:
        work = folding.fold_batchnorm(model, update_statistics=update_bn_statistics)
    else:
        work = folding.rebuild_functional(model)
    annotated, _ = annotate(work, bits=bits, method=method, per_channel=per_channel,
                            activation_bits=activation_bits, unsupported=unsupported,
                            quantizer_options=quantizer_options, allow_float_scales=allow_float_scales)
    with quantize_scope():
        qat = _tq.quantize_apply(annotated, scheme=PO2QuantizeScheme(activation_bits))
    if calibration_data is not None:
        calibrate_activations(qat, calibration_data)
    return qat


def _check_batchnorms_foldable(model, fold_batchnorm):
    """Raises ``ValueError`` for every BatchNormalization fed by a PO2 kernel layer that
    ``fold_batchnorm`` will not fold: the converter folds such a BN into the weights
    (their scales stop being powers of two) or leaves it computing in float."""
    folded = {(c.name, b.name) for c, b in folding._pairs(model)[0]} if fold_batchnorm else set()
    reasons = {(c.name, b.name): r for c, b, r in folding.unfoldable_pairs(model)}
    bad = []
    for name, (users, _) in keras_graph.consumer_layers(model).items():
        layer = model.get_layer(name)
        if _kernel_kind(layer) is None:
            continue
        for bn in users:
            if not isinstance(bn, keras.layers.BatchNormalization) or (name, bn.name) in folded:
                continue
            if not fold_batchnorm:
                reason = "fold_batchnorm=False"
            elif (name, bn.name) in reasons:
                reason = reasons[(name, bn.name)]
            elif type(layer) is keras.layers.Dense:
                reason = "a Dense + BatchNormalization pair is not folded"
            else:
                reason = "the convolution output also feeds other layers"
            bad.append(f"{bn.name} after {name} ({reason})")
    if bad:
        raise ValueError(
            "quantize_model: these BatchNormalization layers cannot be folded into the PO2-quantized kernels "
            "before them: " + "; ".join(bad) + ". The TFLite converter either folds such a BN into the weight "
            "scales (which are then not powers of two) or leaves it computing in float. Fix: use "
            "fold_batchnorm=True with a Conv2D / DepthwiseConv2D (linear activation, channels last, not "
            "shared) whose only consumer is the BatchNormalization, move the BN or the activation, or pass "
            "allow_float_scales=True to accept non-PO2 scales for those weights."
        )


def calibrate_activations(model, x):
    """Sets every tfmot activation range of a QAT model to the range of its tensor on ``x``.

    Runs one eager inference pass on the batch ``x`` in which tfmot's
    ``MovingAverageQuantizer`` and ``AllValuesQuantizer`` (the input) take the
    batch range (0 included, as tfmot does) instead of keeping their stored
    range; each fake-quant op then quantizes with its new range, so the ranges
    downstream see the quantized values the model will compute. Inference mode:
    dropout is off, BN uses its moving statistics, and the PO2 weight quantizers
    write nothing. Only the activation range variables change; later training
    moves them by tfmot's EMA as usual.

    Args:
        model: a QAT model (``quantize_model``).
        x: a batch of representative inputs (a few hundred samples is plenty); NaN or
            Inf raise ``ValueError``.
    """
    moving = tfmot_private.range_ops().moving_average

    def batch_range(inputs, min_var, max_var, per_channel=False, ema_decay=0.999, name_prefix="MovingAvgQuantize",
                    is_training=True, num_bits=8, narrow_range=False, symmetric=False):
        return moving(inputs, min_var, max_var, per_channel=per_channel, ema_decay=0.0, name_prefix=name_prefix,
                      is_training=True, num_bits=num_bits, narrow_range=narrow_range, symmetric=symmetric)

    def input_range(inputs, min_var, max_var, name_prefix="AllValuesQuantize", is_training=True, num_bits=8,
                    narrow_range=False, symmetric=False):
        return batch_range(inputs, min_var, max_var, name_prefix=name_prefix, num_bits=num_bits,
                           narrow_range=narrow_range, symmetric=symmetric)

    for part in tf.nest.flatten(x):
        if not np.all(np.isfinite(np.asarray(part, np.float32))):
            raise ValueError("calibrate_activations: the calibration batch contains NaN or Inf; every "
                             "activation range would become NaN. Pass finite samples")
    with tfmot_private.range_ops_replaced(tfmot_private.RangeOps(batch_range, input_range)):
        model(x, training=False)


def nonfinite_variables(model):
    """Names of the model's floating-point variables that hold NaN or Inf."""
    return [v.name for v in model.variables if v.dtype.is_floating and not np.all(np.isfinite(v.numpy()))]


class QuantizedKernel:
    """One PO2-quantized kernel of a QAT model (see ``quantized_kernels``)."""

    def __init__(self, wrapper, weight, quantizer, state):
        self.wrapper, self.weight, self.quantizer, self.state = wrapper, weight, quantizer, state

    @property
    def layer(self):
        return self.wrapper.layer

    @property
    def name(self):
        return self.wrapper.layer.name

    def view(self):
        return self.quantizer.view(self.weight)

    def bias(self):
        """The float bias added to the kernel's output (the folded BN bias of a folded
        layer), or None."""
        if self.quantizer.folded:
            return self.layer.folded_bias()
        return self.layer.bias if getattr(self.layer, "use_bias", False) else None

    def __repr__(self):
        return f"QuantizedKernel({self.name!r}, layout={self.quantizer.layout!r}, folded={self.quantizer.folded})"


def quantized_kernels(model):
    """``[QuantizedKernel, ...]``: every ``PO2KernelQuantizer`` of a QAT model, in layer order."""
    out = []
    for wrapper in model.layers:
        if not isinstance(wrapper, _tq.QuantizeWrapper):
            continue
        for weight, quantizer, state in tfmot_private.weight_quantizers(wrapper):
            if isinstance(quantizer, PO2KernelQuantizer):
                out.append(QuantizedKernel(wrapper, weight, quantizer, state))
    return out


def freeze_quantizers(model, recalibrate=False):
    """Freezes every PO2 kernel quantizer of a QAT model (eager; idempotent).

    A quantizer that ran in training keeps the exponent of its last training call
    (unless ``recalibrate``); one that never did, or every one with
    ``recalibrate=True``, first takes the exponent a training step would choose
    for the current (folded) kernel. Afterwards inference uses exactly the stored
    exponents, and the exported graph computes what the Keras graph computes.

    Returns:
        The list of ``QuantizedKernel``.
    """
    kernels = quantized_kernels(model)
    for k in kernels:
        fresh = float(np.asarray(k.state["initialized"].numpy())) < 0.5
        k.quantizer.freeze(k.state, inputs=k.weight if (recalibrate or fresh) else None)
    return kernels


def unfreeze_quantizers(model):
    """Lets every PO2 kernel quantizer of a QAT model update its exponent again."""
    for k in quantized_kernels(model):
        k.quantizer.unfreeze(k.state)
