"""The binary networks of Wang et al. (arXiv 2102.04270), standard or low-memory.

Every builder takes ``method``: ``"standard"`` builds the network from plain larq layers
(``QuantDense`` / ``QuantConv2D`` with ``ste_sign`` input and kernel quantizers,
``weight_clip``, no bias, and Keras ``BatchNormalization``: Courbariaux & Bengio
training with float latent weights); ``"low_memory"`` (or ``"low_memory_po2"``, a
:class:`~keras_coherence.binary.config.LowMemoryConfig`, or its dict) builds the same
topology from :mod:`keras_coherence.binary.layers`. Layer names are the same in both,
so weights can be matched by name.

Each binary layer is followed by batch norm (l1 batch norm when the config says so);
the next binary layer binarizes its input, so the batch-norm output of the last layer
is the logits (no softmax: compile with ``from_logits=True``). The first layer keeps its
real input. Low-memory CNV / BinaryNet pool with
:class:`~keras_coherence.binary.layers.LowMemoryMaxPooling2D` (a builtin-only backward
keeping a ``uint8`` argmax) when the config's ``binary_activation_retention`` is on,
else with :class:`~keras_coherence.binary.layers.DeviceMaxPooling2D` (keeping the float
input, as autodiff's ``MaxPoolGrad``); standard ones with Keras ``MaxPooling2D``.

Every method but ``"standard"`` builds only layers whose training step lowers to TFLite
builtins (on-device training, :mod:`keras_coherence.binary.export_training`): batch norm
that is not l1 batch norm is
:class:`~keras_coherence.binary.layers.DeviceBatchNormalization` (standard batch norm,
gamma and beta), and ResNetE-18's real layers are the device layers of
:mod:`keras_coherence.binary.layers` (``DeviceConv2D``, ``DeviceReLU``,
``DeviceMaxPooling2D``, ``DeviceAveragePooling2D``; float32 arithmetic in every method).
``method="standard_device"`` is therefore the standard baseline that exports for
on-device training. ``dense_as_conv=True`` writes every binary
dense layer as a 1x1 binary convolution on ``(1, 1, C)`` tensors, the form the Larq
Compute Engine turns into ``LceBconv2d``.

* :func:`mlp` -- 784-256-256-256-256-10 (MNIST).
* :func:`cnv` -- FINN's CNV (CIFAR-10 / SVHN, 32x32x3).
* :func:`binarynet` -- BinaryNet (CIFAR-10 / SVHN).
* :func:`resnet_e18` -- ResNetE-18 (ImageNet).
* :func:`build_binary_model` -- one of them by name, from the :data:`BINARY_MODELS`
  registry; :func:`register` adds a builder of your own to it.

>>> model = mlp(method="low_memory")
>>> model.count_params(), model.output_shape
(402974, (None, 10))
"""
from __future__ import annotations

import inspect
import numbers
from typing import Sequence

from keras_coherence._deprecation import deprecated_alias
from keras_coherence._keras import keras
from keras_coherence._registry import Registry, lowercase_name
from keras_coherence.binary import layers as bl
from keras_coherence.binary.config import resolve_method
from keras_coherence.models import _check_common

__all__ = ["BINARY_MODELS", "MODEL_NAMES", "build_binary_model", "mlp", "cnv", "binarynet",
           "resnet_e18", "default_input_shape", "register"]

#: The binary model builders by name: :func:`register` adds to it, :func:`build_binary_model` reads it.
BINARY_MODELS = Registry("binary model", normalize=lowercase_name)


def register(name: str, *, aliases: Sequence[str] = (), replace: bool = False):
    """Decorator: make a binary model builder buildable by ``name`` (or any of
    ``aliases``, case-insensitive) with :func:`build_binary_model`. The builder takes
    ``input_shape``, ``num_classes`` and ``method`` keywords; the defaults of the first
    two are its dataset's (:func:`default_input_shape` reads them). A name already taken
    raises ``ValueError`` unless ``replace=True``."""

    def decorate(builder):
        parameters = inspect.signature(builder).parameters
        with_defaults = all(p in parameters and parameters[p].default is not inspect.Parameter.empty
                            for p in ("input_shape", "num_classes"))
        if not with_defaults or "method" not in parameters:
            raise TypeError(f"The binary model builder {builder.__name__} needs the keyword arguments "
                            "input_shape and num_classes, with its dataset's values as defaults, and method.")
        return BINARY_MODELS.add(builder, name, aliases=aliases, replace=replace)

    return decorate

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-4


class _Blocks:
    """Makes the binary layers and batch norms of one model for one method."""

    def __init__(self, method, dense_as_conv=False):
        self.config = resolve_method(method)
        self.method = method if self.config is not None else "standard"
        self.dense_as_conv = bool(dense_as_conv)

    @property
    def standard(self):
        return self.config is None

    def conv(self, x, filters, kernel_size, name, strides=1, padding="valid",
             first_layer=False):
        if self.standard:
            import larq as lq
            layer = lq.layers.QuantConv2D(
                filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                input_quantizer=None if first_layer else "ste_sign",
                kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                kernel_initializer=bl.bnn_initializer(), name=name)
        else:
            layer = bl.BinaryConv2D(filters, kernel_size, strides=strides, padding=padding,
                                    first_layer=first_layer, method=self.config, name=name)
        return layer(x)

    def dense(self, x, units, name, first_layer=False):
        """A binary dense layer on a flat ``x`` (or on ``(1, 1, C)`` in conv form)."""
        if self.dense_as_conv:
            return self.conv(x, units, 1, name, first_layer=first_layer)
        if self.standard:
            import larq as lq
            layer = lq.layers.QuantDense(
                units, use_bias=False, input_quantizer=None if first_layer else "ste_sign",
                kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                kernel_initializer=bl.bnn_initializer(), name=name)
        else:
            layer = bl.BinaryDense(units, first_layer=first_layer, method=self.config,
                                   name=name)
        return layer(x)

    def flatten(self, x, name="flatten"):
        x = keras.layers.Flatten(name=name)(x)
        if self.dense_as_conv:
            x = keras.layers.Reshape((1, 1, int(x.shape[-1])), name=f"{name}_to_1x1")(x)
        return x

    def unflatten(self, x, name="logits_flat"):
        return keras.layers.Flatten(name=name)(x) if self.dense_as_conv else x

    def max_pool(self, x, name):
        """2x2 max pool; other methods than standard use one with a builtin-only backward:
        the argmax-keeping one with binary activation retention, else the float one."""
        if self.standard:
            layer = keras.layers.MaxPooling2D
        elif self.config.binary_activation_retention:
            layer = bl.LowMemoryMaxPooling2D
        else:
            layer = bl.DeviceMaxPooling2D
        return layer(2, name=name)(x)

    def batch_norm(self, x, name, binary=True):
        """Batch norm after a layer; l1 batch norm after binary layers when configured,
        else standard batch norm (with a builtin-only backward unless standard)."""
        if binary and not self.standard and self.config.l1_batchnorm:
            return bl.L1BatchNormalization(momentum=BN_MOMENTUM, method=self.config,
                                           name=name)(x)
        layer = keras.layers.BatchNormalization if self.standard else bl.DeviceBatchNormalization
        return layer(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)

    # real (non-binary) layers of ResNetE-18 ----------------------------------------------
    def real_conv(self, x, filters, kernel_size, name, strides=1, padding="valid"):
        """A float convolution without bias."""
        layer = keras.layers.Conv2D if self.standard else bl.DeviceConv2D
        return layer(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                     name=name)(x)

    def relu(self, x, name):
        if self.standard:
            return keras.layers.Activation("relu", name=name)(x)
        return bl.DeviceReLU(name=name)(x)

    def real_max_pool(self, x, pool_size, strides, padding, name):
        layer = keras.layers.MaxPooling2D if self.standard else bl.DeviceMaxPooling2D
        return layer(pool_size, strides=strides, padding=padding, name=name)(x)

    def avg_pool(self, x, pool_size, name):
        layer = keras.layers.AveragePooling2D if self.standard else bl.DeviceAveragePooling2D
        return layer(pool_size, name=name)(x)


def _check_widths(name, widths):
    widths = tuple(widths)
    if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in widths):
        raise ValueError(f"{name}={widths!r} must be a sequence of positive integers.")
    return tuple(int(w) for w in widths)


def _image_shape(builder, input_shape, num_classes, min_size):
    shape, num_classes = _check_common(input_shape, num_classes)
    if len(shape) != 3 or min(shape[:2]) < min_size:
        raise ValueError(
            f"{builder} needs images (height, width, channels) of at least "
            f"{min_size}x{min_size}, got input_shape={tuple(input_shape)!r}.")
    return shape, num_classes


def _dense_head(b, h, widths, num_classes, first_index):
    """Flatten, then binary dense + batch norm for each width and for the logits."""
    h = b.flatten(h)
    last = first_index + len(widths)
    for i, width in enumerate(tuple(widths) + (num_classes,), start=first_index):
        name = "logits" if i == last else f"fc_{i}"
        h = b.dense(h, width, name, first_layer=(i == 1))
        h = b.batch_norm(h, "logits_bn" if i == last else f"bn_fc_{i}")
    return b.unflatten(h)


@register("mlp")
def mlp(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
        method="standard", hidden: Sequence[int] = (256, 256, 256, 256),
        dense_as_conv: bool = False, name: str = "bnn_mlp") -> keras.Model:
    """The paper's MNIST MLP: ``784 -> 256 x 4 -> 10``, binary weights everywhere, binary
    activations after the first layer, batch norm after every layer.

    Layers: ``fc_1`` .. ``fc_K`` + ``bn_fc_k``, then ``logits`` + ``logits_bn``.
    """
    shape, num_classes = _check_common(input_shape, num_classes)
    widths = _check_widths("hidden", hidden)
    b = _Blocks(method, dense_as_conv)
    inputs = keras.Input(shape, name="input")
    outputs = _dense_head(b, inputs, widths, num_classes, first_index=1)
    return keras.Model(inputs, outputs, name=name)


def _conv_bn(b, h, filters, index, padding, first_layer=False, pool_before_bn=False):
    h = b.conv(h, filters, 3, f"conv_{index}", padding=padding, first_layer=first_layer)
    if pool_before_bn:
        h = b.max_pool(h, f"pool_{index}")
    return b.batch_norm(h, f"bn_conv_{index}")


def _vgg_like(builder, input_shape, num_classes, method, filters, fc, dense_as_conv, name,
              padding, min_size, pool_before_bn):
    """Six 3x3 binary convs in pairs with a 2x2 max pool after each pair (the last pair's
    pool only with ``"same"`` padding), then the binary dense head."""
    shape, num_classes = _image_shape(builder, input_shape, num_classes, min_size)
    filters = _check_widths("filters", filters)
    if len(filters) != 6:
        raise ValueError(f"filters={filters!r} must have 6 entries.")
    b = _Blocks(method, dense_as_conv)
    inputs = keras.Input(shape, name="input")
    h = inputs
    for i, f in enumerate(filters, start=1):
        pooled = i % 2 == 0 and (pool_before_bn or i < 6)
        h = _conv_bn(b, h, f, i, padding, first_layer=(i == 1),
                     pool_before_bn=pooled and pool_before_bn)
        if pooled and not pool_before_bn:
            h = b.max_pool(h, f"pool_{i}")
    outputs = _dense_head(b, h, _check_widths("fc", fc), num_classes, first_index=7)
    return keras.Model(inputs, outputs, name=name)


@register("cnv")
def cnv(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, method="standard",
        filters: Sequence[int] = (64, 64, 128, 128, 256, 256), fc: Sequence[int] = (512, 512),
        dense_as_conv: bool = False, name: str = "cnv") -> keras.Model:
    """FINN's CNV: 3x3 valid convs 64, 64 - pool - 128, 128 - pool - 256, 256 - FC 512,
    512, logits. Pooling follows the second batch norm of each pair (it commutes with the
    next layer's input binarization)."""
    return _vgg_like("cnv", input_shape, num_classes, method, filters, fc, dense_as_conv,
                     name, "valid", 32, pool_before_bn=False)  # 32 -> 5x5 after pool_4 -> 1x1


@register("binarynet", aliases=("binary_net",))
def binarynet(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
              method="standard", filters: Sequence[int] = (128, 128, 256, 256, 512, 512),
              fc: Sequence[int] = (1024, 1024), dense_as_conv: bool = False,
              name: str = "binarynet") -> keras.Model:
    """BinaryNet (Courbariaux et al.): 3x3 same convs 128, 128 - pool - 256, 256 - pool -
    512, 512 - pool - FC 1024, 1024, logits. Each pool sits between a conv and its batch
    norm, as in the paper's code."""
    return _vgg_like("binarynet", input_shape, num_classes, method, filters, fc,
                     dense_as_conv, name, "same", 8, pool_before_bn=True)


@register("resnet_e18", aliases=("resnete18", "resnet-e18", "resnete-18"))
def resnet_e18(input_shape: Sequence[int] = (224, 224, 3), num_classes: int = 1000,
               method="standard", width: int = 64, name: str = "resnet_e18",
               units_per_stage: Sequence[int] = (4, 4, 4, 4)) -> keras.Model:
    """ResNetE-18 (Bethge et al.; larq-zoo's ``BinaryResNetE18`` topology).

    Real stem: 7x7/2 conv ``width`` + BN + ReLU + 3x3/2 max pool. Then 4 stages x 2
    blocks x 2 binary units, each ``sign -> binary 3x3 conv -> BN -> + shortcut`` (the
    shortcut is the identity, or 2x2 average pool + real 1x1 conv + BN where the stage
    halves the resolution and doubles the width). Head: ReLU, global average pool, real
    dense logits. Binary units are named ``stage{s}_block{b}_conv{u}``.

    ``units_per_stage`` cuts or deepens the stages (``(1, 1)``: one identity unit and
    one downsampling unit, every layer kind of the full model in a fraction of its
    conversion time).

    With any method but ``"standard"``, the real layers are the device layers of
    :mod:`keras_coherence.binary.layers` (same weights and names), so the whole
    training step lowers to TFLite builtins.
    """
    shape, num_classes = _image_shape("resnet_e18", input_shape, num_classes, 32)
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
        raise ValueError(f"width={width!r} must be a positive integer.")
    units = tuple(units_per_stage) if isinstance(units_per_stage, (list, tuple)) else ()
    if not units or any(isinstance(u, bool) or not isinstance(u, numbers.Integral) or u < 1 for u in units):
        raise ValueError(f"units_per_stage={units_per_stage!r} must be a non-empty list or tuple of "
                         "positive integers (ResNetE-18: (4, 4, 4, 4)).")
    b = _Blocks(method)
    inputs = keras.Input(shape, name="input")
    h = b.real_conv(inputs, width, 7, "stem_conv", strides=2, padding="same")
    h = b.batch_norm(h, "stem_bn", binary=False)
    h = b.relu(h, "stem_relu")
    h = b.real_max_pool(h, 3, 2, "same", "stem_pool")
    for stage, count in enumerate(units):
        for unit in range(count):
            prefix = f"stage{stage + 1}_block{unit // 2 + 1}_conv{unit % 2 + 1}"
            down = stage > 0 and unit == 0
            filters = width * 2 ** stage
            y = b.conv(h, filters, 3, prefix, strides=2 if down else 1, padding="same")
            y = b.batch_norm(y, f"{prefix}_bn")
            shortcut = h
            if down:
                shortcut = b.avg_pool(h, 2, f"{prefix}_sc_pool")
                shortcut = b.real_conv(shortcut, filters, 1, f"{prefix}_sc_conv")
                shortcut = b.batch_norm(shortcut, f"{prefix}_sc_bn", binary=False)
            h = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    h = b.relu(h, "head_relu")
    h = keras.layers.GlobalAveragePooling2D(name="head_pool")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


#: Names of the package's own builders (``list(BINARY_MODELS)`` adds any registered since).
MODEL_NAMES = tuple(BINARY_MODELS)


def default_input_shape(name: str):
    """``(input_shape, num_classes)`` of the paper's dataset for a model name: the
    defaults of its builder.

    >>> default_input_shape("ResNetE18")
    ((224, 224, 3), 1000)
    """
    parameters = inspect.signature(BINARY_MODELS.lookup(name)).parameters
    return parameters["input_shape"].default, parameters["num_classes"].default


def build_binary_model(name: str, method="standard", input_shape=None, num_classes=None,
                       **kwargs) -> keras.Model:
    """Build a binary model by name (:data:`BINARY_MODELS`), with the paper's input shape
    and class count unless given.

    >>> build_binary_model("cnv", "low_memory").count_params()
    1548638
    >>> build_binary_model("alexnet")
    Traceback (most recent call last):
    ...
    ValueError: Unknown binary model 'alexnet'. Known binary models: mlp, cnv, binarynet, resnet_e18.
    """
    builder = BINARY_MODELS.lookup(name)
    default_shape, default_classes = default_input_shape(name)
    return builder(input_shape=input_shape or default_shape, num_classes=num_classes or default_classes,
                   method=method, **kwargs)


build_model = deprecated_alias("keras_coherence.binary.models.build_model", build_binary_model)
