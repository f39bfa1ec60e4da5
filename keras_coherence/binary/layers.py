"""Keras layers for low-memory binary-network training (Wang et al., arXiv 2102.04270).

* :class:`BinaryDense` / :class:`BinaryConv2D` -- a binary layer in larq's style: it
  binarizes its *input* (``sign`` with a straight-through estimator, except for a
  ``first_layer``) and its kernel (``sign(clip(w))``), and has no bias. Its backward pass
  is the hand-written one of :func:`~keras_coherence.binary.ops.binary_matmul` /
  :func:`~keras_coherence.binary.ops.binary_conv2d`, which keeps sign bits instead of
  float inputs and rounds gradients as the layer's ``method`` says.
* :class:`L1BatchNormalization` -- batch norm by mean absolute deviation, beta only,
  whose backward needs only ``sign(x_hat)``.
* :class:`LowMemoryMaxPooling2D` -- Keras ``MaxPooling2D`` (square, stride = pool size)
  whose backward keeps the argmax index and is built from TFLite builtins
  (:func:`~keras_coherence.binary.ops.max_pool2d`) instead of autodiff's ``MaxPoolGrad``.

The *device* layers replace the real (non-binary) Keras layers of the standard baseline
(``method="standard_device"``) and of ResNetE-18 so that their training step lowers to
TFLite builtins too. Each subclasses the Keras layer it replaces (same arguments,
weights, names and config; the inference path is unchanged) and overrides the training
computation with a hand-written backward from :mod:`keras_coherence.binary.real_ops`:

* :class:`DeviceBatchNormalization` -- ``BatchNormalization`` (gamma and beta), standard
  backward keeping ``x_hat`` in float32;
* :class:`DeviceConv2D` -- ``Conv2D`` with a float kernel (the ResNetE-18 stem and
  shortcut convolutions);
* :class:`DeviceReLU` -- ``Activation("relu")``, keeping a ``bool`` mask;
* :class:`DeviceMaxPooling2D` -- ``MaxPooling2D`` with any window, strides and padding
  (overlapping windows too), keeping the float32 input as ``MaxPoolGrad`` does;
* :class:`DeviceAveragePooling2D` -- ``AveragePooling2D``, keeping nothing.

``method`` is ``"low_memory"`` (default), ``"low_memory_po2"``, a
:class:`~keras_coherence.binary.config.LowMemoryConfig` or its dict, or ``"standard"``
(the same hand-written backward with every technique off: float32 everywhere, float
inputs kept -- numerically the Courbariaux & Bengio STE gradient).

A 1x1 :class:`BinaryConv2D` on ``(1, 1, C)`` inputs is a binary dense layer in the form
that the Larq Compute Engine maps to ``LceBconv2d`` (LCE has no binary fully-connected
kernel); the model builders use it with ``dense_as_conv=True``.

Kernels carry ``precision = 1`` so that ``larq.optimizers.Bop.is_binary_variable``
claims them inside a ``larq.optimizers.CaseOptimizer``.
"""
from __future__ import annotations

from keras_coherence._keras import keras, tf
from keras_coherence.binary import ops, real_ops
from keras_coherence.binary.config import resolve_method

__all__ = ["BinaryDense", "BinaryConv2D", "L1BatchNormalization", "LowMemoryMaxPooling2D",
           "DeviceBatchNormalization", "DeviceConv2D", "DeviceReLU", "DeviceMaxPooling2D",
           "DeviceAveragePooling2D", "bnn_initializer", "LOW_MEMORY_LAYERS", "DEVICE_LAYERS"]


def bnn_initializer():
    """``N(0, 1/fan_in)``, the paper's kernel initializer."""
    return keras.initializers.VarianceScaling(1.0, "fan_in", "untruncated_normal")


def _config_dict(config):
    return None if config is None else config.get_config()


def _method_arg(method):
    return "standard" if method is None else method


class _BinaryLayer(keras.layers.Layer):
    """Shared plumbing: the method, the kernel, ``first_layer``."""

    builtin_backward = True  # its backward lowers to TFLite builtins (on-device training)

    def __init__(self, first_layer=False, method="low_memory", kernel_initializer=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(first_layer, bool):
            raise ValueError(f"first_layer={first_layer!r} must be True or False.")
        self.first_layer = first_layer
        self.config = resolve_method(_method_arg(method))
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer if kernel_initializer is not None else bnn_initializer())

    def _add_kernel(self, shape):
        kernel = self.add_weight("kernel", shape=shape, initializer=self.kernel_initializer,
                                 trainable=True, dtype=self.dtype)
        kernel.precision = 1  # lets larq's Bop claim it
        return kernel

    def get_config(self):
        config = super().get_config()
        config.update(first_layer=self.first_layer,
                      method=_config_dict(self.config) or "standard",
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config


@keras.utils.register_keras_serializable(package="keras_coherence")
class BinaryDense(_BinaryLayer):
    """Binary fully-connected layer: ``sign(x) @ sign(clip(W))``, no bias.

    Args:
        units: output width.
        first_layer: keep the real input (no input binarization, float input stored).
        method: see the module docstring.
        kernel_initializer: default ``N(0, 1/fan_in)``.

    >>> layer = BinaryDense(4)
    >>> layer(tf.ones((2, 3))).shape
    TensorShape([2, 4])
    """

    def __init__(self, units, first_layer=False, method="low_memory", kernel_initializer=None,
                 **kwargs):
        super().__init__(first_layer, method, kernel_initializer, **kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"units={units!r} must be a positive integer.")
        self.units = units
        self.input_spec = keras.layers.InputSpec(ndim=2)

    def build(self, input_shape):
        self.kernel = self._add_kernel((int(input_shape[-1]), self.units))
        self.built = True

    def call(self, inputs):
        return ops.binary_matmul(inputs, self.kernel, self.config, self.first_layer)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def get_config(self):
        config = super().get_config()
        config["units"] = self.units
        return config


@keras.utils.register_keras_serializable(package="keras_coherence")
class BinaryConv2D(_BinaryLayer):
    """Binary 2-D convolution (NHWC): ``conv2d(sign(x), sign(clip(W)))``, no bias.

    Zero padding (``"same"``) pads the *binarized* input with zeros, as larq's default
    ``pad_values=0``. ``dilation_rate > 1`` (atrous) needs ``strides == 1``, as Keras's
    ``Conv2D``.

    >>> BinaryConv2D(8, 3, padding="same")(tf.ones((1, 5, 5, 2))).shape
    TensorShape([1, 5, 5, 8])
    """

    def __init__(self, filters, kernel_size, strides=1, padding="valid", first_layer=False,
                 method="low_memory", kernel_initializer=None, dilation_rate=1, **kwargs):
        super().__init__(first_layer, method, kernel_initializer, **kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"filters={filters!r} must be a positive integer.")
        self.filters = filters
        self.kernel_size = ops._pair(kernel_size)
        self.strides = ops._pair(strides)
        if min(self.kernel_size) < 1 or min(self.strides) < 1:
            raise ValueError(f"kernel_size={kernel_size!r} and strides={strides!r} must be >= 1.")
        self.dilation_rate = ops._pair(dilation_rate)
        if min(self.dilation_rate) < 1:
            raise ValueError(f"dilation_rate={dilation_rate!r} must be >= 1.")
        if self.strides != (1, 1) and self.dilation_rate != (1, 1):
            raise ValueError(f"strides={strides!r} with dilation_rate={dilation_rate!r}: use "
                             "strides > 1 or dilation_rate > 1, not both (as Keras's Conv2D).")
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(f"padding={padding!r} must be 'valid' or 'same'.")
        self.padding = padding.lower()
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        self.kernel = self._add_kernel(self.kernel_size + (int(input_shape[-1]), self.filters))
        self.built = True

    def call(self, inputs):
        return ops.binary_conv2d(inputs, self.kernel, self.strides, self.padding,
                                 self.config, self.first_layer, self.dilation_rate)

    def compute_output_shape(self, input_shape):
        n, h, w, _ = tf.TensorShape(input_shape).as_list()
        kh, kw = ((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation_rate))
        if self.padding == "same":
            h, w = -(-h // self.strides[0]), -(-w // self.strides[1])
        else:
            h = (h - kh) // self.strides[0] + 1
            w = (w - kw) // self.strides[1] + 1
        return tf.TensorShape([n, h, w, self.filters])

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                      padding=self.padding, dilation_rate=self.dilation_rate)
        return config


@keras.utils.register_keras_serializable(package="keras_coherence")
class L1BatchNormalization(keras.layers.Layer):
    """Batch norm by mean absolute deviation with a trainable beta (no gamma).

    Training: per channel (all axes but the last), ``mu = mean(x)``,
    ``sigma = mean|x - mu| + epsilon``, output ``(x - mu) / sigma + beta``; the moving
    statistics follow ``m <- momentum * m + (1 - momentum) * batch``. Inference uses the
    moving statistics. With float16 latent weights (the method's ``latent_weights``),
    ``mu``, ``sigma`` and ``beta`` are rounded to float16, and so is beta's gradient.
    The backward pass is :func:`~keras_coherence.binary.ops.l1_normalize`.

    Args:
        momentum: of the moving statistics (0.9 in the paper).
        epsilon: added to ``sigma`` so that a constant channel does not divide by zero.
        method: see the module docstring (its ``activation_grad`` rounds ``dy``).
    """

    builtin_backward = True

    def __init__(self, momentum=0.9, epsilon=1e-6, method="low_memory", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1).")
        if float(epsilon) < 0.0:
            raise ValueError(f"epsilon={epsilon!r} must be >= 0.")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.config = resolve_method(_method_arg(method))

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.beta = self.add_weight("beta", shape=(channels,), initializer="zeros",
                                    trainable=True)
        self.moving_mean = self.add_weight("moving_mean", shape=(channels,),
                                           initializer="zeros", trainable=False)
        self.moving_sigma = self.add_weight("moving_sigma", shape=(channels,),
                                            initializer="ones", trainable=False)
        self.built = True

    def _batch_stats(self, x):
        axes = list(range(len(x.shape) - 1))
        x = tf.stop_gradient(x)
        mean = tf.reduce_mean(x, axis=axes)
        sigma = tf.reduce_mean(tf.abs(x - mean), axis=axes) + self.epsilon
        return ops.round_latent(mean, self.config), ops.round_latent(sigma, self.config)

    def call(self, inputs, training=None):
        if training is None:
            training = keras.backend.learning_phase()
        beta = ops.latent_weight(tf.convert_to_tensor(self.beta), self.config)
        if isinstance(training, (bool, int)) and not isinstance(training, tf.Tensor):
            return self._train(inputs, beta) if training else self._infer(inputs, beta)
        return tf.cond(tf.cast(training, tf.bool), lambda: self._train(inputs, beta),
                       lambda: self._infer(inputs, beta))

    def _train(self, x, beta):
        mean, sigma = self._batch_stats(x)
        m = self.momentum
        self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * mean)
        self.moving_sigma.assign(m * self.moving_sigma + (1.0 - m) * sigma)
        return ops.l1_normalize(x, mean, sigma, self.config, beta=beta)

    def _infer(self, x, beta):
        mean = ops.round_latent(tf.convert_to_tensor(self.moving_mean), self.config)
        sigma = ops.round_latent(tf.convert_to_tensor(self.moving_sigma), self.config)
        return (x - mean) / sigma + beta

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, epsilon=self.epsilon,
                      method=_config_dict(self.config) or "standard")
        return config


@keras.utils.register_keras_serializable(package="keras_coherence")
class LowMemoryMaxPooling2D(keras.layers.MaxPooling2D):
    """``keras.layers.MaxPooling2D`` with the hand-written backward of
    :func:`~keras_coherence.binary.ops.max_pool2d`: it keeps one ``uint8`` argmax index
    per output and routes the gradient to the first maximum of each window (row-major),
    the element TF's ``MaxPoolGrad`` picks on ties, with ops that have TFLite builtins.

    Same arguments and config as ``MaxPooling2D``; only square pools with
    ``strides == pool_size`` (the default), ``channels_last`` and static spatial shapes.

    >>> LowMemoryMaxPooling2D(2)(tf.ones((1, 5, 4, 3))).shape
    TensorShape([1, 2, 2, 3])
    >>> LowMemoryMaxPooling2D(3, strides=2)
    Traceback (most recent call last):
    ...
    ValueError: LowMemoryMaxPooling2D needs a square pool with strides equal to pool_size (non-overlapping windows); got pool_size=(3, 3), strides=(2, 2).
    """

    builtin_backward = True

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None,
                 **kwargs):
        super().__init__(pool_size, strides, padding, data_format, **kwargs)
        if self.pool_size[0] != self.pool_size[1] or tuple(self.strides) != tuple(self.pool_size):
            raise ValueError(
                f"{type(self).__name__} needs a square pool with strides equal to pool_size "
                f"(non-overlapping windows); got pool_size={tuple(self.pool_size)}, "
                f"strides={tuple(self.strides)}.")
        if self.data_format != "channels_last":
            raise ValueError(f"{type(self).__name__} supports channels_last only; got "
                             f"data_format={self.data_format!r}.")

    def call(self, inputs):
        return ops.max_pool2d(inputs, self.pool_size[0], self.padding)


def _training_flag(layer, training):
    """``training`` resolved as Keras does (the learning phase when None; False for a
    frozen layer): a Python bool or a bool tensor."""
    if training is None:
        training = keras.backend.learning_phase()
    if isinstance(training, int) and not isinstance(training, tf.Tensor):
        training = bool(training)
    if not layer.trainable:
        training = False
    if isinstance(training, tf.Tensor):
        static = tf.get_static_value(training)
        if static is not None:
            training = bool(static)
    return training


def _train_or_infer(training, train, infer):
    if isinstance(training, bool):
        return train() if training else infer()
    return tf.cond(tf.cast(training, tf.bool), train, infer)


@keras.utils.register_keras_serializable(package="keras_coherence")
class DeviceBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training step has a hand-written,
    builtin-only backward (:func:`~keras_coherence.binary.real_ops.batch_norm`).

    Same arguments, weights (gamma, beta, moving mean, moving variance) and config as
    Keras's layer, and the same inference path. Training normalizes by the batch's mean
    and biased variance over every axis but the last and updates the moving statistics
    as Keras does: ``m <- momentum * m + (1 - momentum) * batch``, with the variance
    Bessel-corrected (``n / (n - 1)``) where Keras uses its fused kernel (rank-4 inputs)
    and biased otherwise. The backward keeps ``x_hat`` (float32) and ``1/sigma`` per
    channel instead of autodiff's ``FusedBatchNormGradV3`` (no TFLite builtin).

    Only ``axis=-1`` without renorm, virtual batches or adjustment.

    >>> bn = DeviceBatchNormalization(momentum=0.9, epsilon=1e-4)
    >>> y = bn(tf.constant([[0.0], [2.0]]), training=True)
    >>> [round(v, 4) for v in y.numpy().ravel().tolist()], bn.moving_mean.numpy().tolist()
    ([-1.0, 1.0], [0.10000000149011612])
    """

    builtin_backward = True

    def __init__(self, axis=-1, **kwargs):
        super().__init__(axis=axis, **kwargs)
        bad = [name for name, value in (("renorm", self.renorm),
                                        ("virtual_batch_size", self.virtual_batch_size),
                                        ("adjustment", self.adjustment),
                                        ("synchronized", getattr(self, "synchronized", False)))
               if value]
        if bad:
            raise ValueError(f"{type(self).__name__} does not support {', '.join(bad)}; use "
                             "keras.layers.BatchNormalization (not exportable for on-device "
                             "training).")

    def build(self, input_shape):
        super().build(input_shape)
        rank = len(input_shape)
        if list(self.axis) != [rank - 1]:
            raise ValueError(f"{type(self).__name__} normalizes the last axis only; got "
                             f"axis={self.axis} for inputs of rank {rank}.")

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError(f"{type(self).__name__} does not take a mask.")
        training = _training_flag(self, training)
        return _train_or_infer(training, lambda: self._train(inputs),
                               lambda: super(DeviceBatchNormalization, self).call(
                                   inputs, training=False))

    def _train(self, x):
        x = tf.cast(x, self.compute_dtype)
        axes = list(range(x.shape.rank - 1))
        xs = tf.stop_gradient(x)
        mean = tf.reduce_mean(xs, axis=axes)
        variance = tf.reduce_mean(tf.square(xs - mean), axis=axes)
        moving_variance = variance
        if self.fused:  # Keras's fused kernel updates with the unbiased variance
            n = 1
            for d in x.shape[:-1]:
                n *= int(d) if d is not None else 0
            if n > 1:
                moving_variance = variance * (n / (n - 1.0))
            elif n == 0:  # unknown batch: count at run time
                count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
                moving_variance = variance * count / tf.maximum(count - 1.0, 1.0)
        m = self.momentum
        self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * mean)
        self.moving_variance.assign(m * self.moving_variance + (1.0 - m) * moving_variance)
        return real_ops.batch_norm(x, mean, variance, self.gamma, self.beta, self.epsilon)


@keras.utils.register_keras_serializable(package="keras_coherence")
class DeviceConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` (float kernel) whose backward is hand-written from TFLite
    builtins (:func:`~keras_coherence.binary.real_ops.conv2d`) instead of autodiff's
    ``Conv2DBackpropFilter``; the bias, if any, is a broadcast add.

    Same arguments, weights and config as ``Conv2D``; only ``channels_last``,
    ``groups=1``, ``"valid"``/``"same"`` padding and no activation (follow it with
    :class:`DeviceReLU`). A TFLite training model of it needs a fixed batch size.

    >>> DeviceConv2D(8, 7, strides=2, padding="same", use_bias=False)(tf.ones((1, 32, 32, 3))).shape
    TensorShape([1, 16, 16, 8])
    """

    builtin_backward = True

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        if self.data_format != "channels_last" or self.groups != 1:
            raise ValueError(f"{type(self).__name__} supports channels_last and groups=1 only; "
                             f"got data_format={self.data_format!r}, groups={self.groups}.")
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding={self.padding!r} must be 'valid' or 'same'.")
        if getattr(self.activation, "__name__", "linear") != "linear":
            raise ValueError(f"{type(self).__name__} takes no activation (its autodiff "
                             f"gradient has no TFLite builtin); got "
                             f"{self.activation.__name__!r}: add a DeviceReLU after it.")

    def convolution_op(self, inputs, kernel):
        return real_ops.conv2d(inputs, kernel, self.strides, self.padding, self.dilation_rate)

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel)
        if self.use_bias:
            outputs = outputs + self.bias
        return outputs


@keras.utils.register_keras_serializable(package="keras_coherence")
class DeviceReLU(keras.layers.Activation):
    """``keras.layers.Activation("relu")`` whose backward keeps the ``bool`` mask
    ``x > 0`` (:func:`~keras_coherence.binary.real_ops.relu`) instead of autodiff's
    ``ReluGrad`` (no TFLite builtin) on the float output.

    >>> DeviceReLU()(tf.constant([-1.0, 2.0])).numpy().tolist()
    [0.0, 2.0]
    """

    builtin_backward = True

    def __init__(self, activation="relu", **kwargs):
        name = activation if isinstance(activation, str) else getattr(activation, "__name__", None)
        if name != "relu":
            raise ValueError(f"{type(self).__name__} is a ReLU; got activation={activation!r}.")
        super().__init__("relu", **kwargs)

    def call(self, inputs):
        return real_ops.relu(inputs)


def _check_channels_last(layer):
    if layer.data_format != "channels_last":
        raise ValueError(f"{type(layer).__name__} supports channels_last only; got "
                         f"data_format={layer.data_format!r}.")


@keras.utils.register_keras_serializable(package="keras_coherence")
class DeviceMaxPooling2D(keras.layers.MaxPooling2D):
    """``keras.layers.MaxPooling2D`` with the builtin-only backward of
    :func:`~keras_coherence.binary.real_ops.max_pool2d`: any window, strides and padding
    (overlapping windows such as ResNet's 3x3/2 stem pool included); it keeps the
    float32 input, as autodiff's ``MaxPoolGrad`` does, and routes each gradient to the
    first maximum of its window (row-major), the element ``MaxPoolGrad`` picks on ties.
    (:class:`LowMemoryMaxPooling2D` keeps a ``uint8`` argmax instead, for
    non-overlapping windows only.)

    Same arguments and config as ``MaxPooling2D``; ``channels_last`` and static spatial
    shapes.

    >>> DeviceMaxPooling2D(3, strides=2, padding="same")(tf.ones((1, 16, 16, 2))).shape
    TensorShape([1, 8, 8, 2])
    """

    builtin_backward = True

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None,
                 **kwargs):
        super().__init__(pool_size, strides, padding, data_format, **kwargs)
        _check_channels_last(self)

    def call(self, inputs):
        return real_ops.max_pool2d(inputs, self.pool_size, self.strides, self.padding)


@keras.utils.register_keras_serializable(package="keras_coherence")
class DeviceAveragePooling2D(keras.layers.AveragePooling2D):
    """``keras.layers.AveragePooling2D`` with the builtin-only backward of
    :func:`~keras_coherence.binary.real_ops.avg_pool2d` (autodiff's ``AvgPoolGrad`` has
    no TFLite builtin): any window, strides and padding; it keeps nothing of the input.

    >>> DeviceAveragePooling2D(2)(tf.ones((1, 5, 4, 3))).shape
    TensorShape([1, 2, 2, 3])
    """

    builtin_backward = True

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None,
                 **kwargs):
        super().__init__(pool_size, strides, padding, data_format, **kwargs)
        _check_channels_last(self)

    def call(self, inputs):
        return real_ops.avg_pool2d(inputs, self.pool_size, self.strides, self.padding)


#: The layer classes whose memory the low-memory rules of ``memory.py`` describe.
LOW_MEMORY_LAYERS = (BinaryDense, BinaryConv2D, L1BatchNormalization)

#: Keras layers with a builtin-only training step, each a subclass of the one it replaces.
DEVICE_LAYERS = (DeviceBatchNormalization, DeviceConv2D, DeviceReLU, DeviceMaxPooling2D,
                 DeviceAveragePooling2D)
