"""Batch-norm folding for quantization-aware training (QAT).

``fold_batchnorm(model)`` rewrites a Functional or Sequential model: every
``Conv2D`` / ``DepthwiseConv2D`` (optional bias, linear activation) whose output
feeds only a ``BatchNormalization`` is replaced, together with that BN, by one
``FoldedConv2D`` / ``FoldedDepthwiseConv2D`` layer that computes

    y = conv(x, W * f) + (beta + (b - mean) * f),   f = gamma / sqrt(var + eps)

per output channel. The layer keeps ``W``, ``b``, ``gamma`` and ``beta`` as
trainable variables and the BN's moving statistics as non-trainable ones, and
exposes the folded kernel ``W * f`` (``fold_kernel``): that is the tensor a weight
quantizer sees, so the scale a quantizer picks for it is the scale the TFLite
converter exports (the converter has no BN left to fold into the weights).

Frozen-statistics folding: the fold always uses the *moving* statistics, in
training as in inference (this is the "freeze BN statistics" phase of Jacob et al.
2018 from the first step). The folded model computes exactly what the float model
computes in inference (``training=False``); in training it differs from the float
model, whose BN would normalize with the batch statistics. With
``update_statistics=True`` the moving statistics still follow the batch
statistics of the float, unfolded convolution output ``conv(x, W) + b`` (computed
without gradient, Keras BN's momentum update); the forward pass of that step
folds with the statistics from before the update. With ``update_statistics=False``
(the default) they stay as they were in the float model.

>>> inp = keras.Input((8, 8, 3))
>>> x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inp)
>>> x = keras.layers.BatchNormalization(name="bn")(x)
>>> folded = fold_batchnorm(keras.Model(inp, keras.layers.ReLU()(x)))
>>> [type(layer).__name__ for layer in folded.layers]
['InputLayer', 'FoldedConv2D', 'ReLU']
>>> folded.get_layer("conv").bn_name
'bn'
"""
import warnings

from keras_coherence._internals import keras_graph
from keras_coherence._keras import keras, tf

__all__ = [
    "FoldedConv2D", "FoldedDepthwiseConv2D", "fold_batchnorm", "foldable_pairs", "unfoldable_pairs",
    "rebuild_functional",
]

_register = keras.utils.register_keras_serializable(package="keras_coherence")


class _FoldedBatchNormMixin:
    """The BN half of a folded layer: variables, fold factor, folded bias, stats update."""

    def _init_bn(self, bn_epsilon, bn_momentum, bn_center, bn_scale, gamma_regularizer, beta_regularizer,
                 gamma_constraint, beta_constraint, update_statistics, bn_name):
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.bn_center = bool(bn_center)
        self.bn_scale = bool(bn_scale)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.update_statistics = bool(update_statistics)
        self.bn_name = bn_name
        # Set by a QuantizeConfig right before call(): the quantized folded kernel.
        # Consumed (and cleared) by the next call, so a stale tensor is never reused.
        object.__setattr__(self, "_pending_kernel", None)

    def _build_bn(self, channels):
        def add(name, init, trainable, regularizer=None, constraint=None):
            # Moving statistics are created like Keras BN creates them (on-read, mean).
            sync = tf.VariableSynchronization
            return self.add_weight(
                name=name, shape=(channels,), dtype=self.dtype, initializer=init, trainable=trainable,
                regularizer=regularizer, constraint=constraint,
                aggregation=tf.VariableAggregation.NONE if trainable else tf.VariableAggregation.MEAN,
                synchronization=sync.AUTO if trainable else sync.ON_READ,
            )

        self.gamma = add("gamma", "ones", self.bn_scale, self.gamma_regularizer, self.gamma_constraint)
        self.beta = add("beta", "zeros", self.bn_center, self.beta_regularizer, self.beta_constraint)
        self.moving_mean = add("moving_mean", "zeros", False)
        self.moving_variance = add("moving_variance", "ones", False)

    def bn_factor(self):
        """``f = gamma / sqrt(moving_variance + eps)``, one value per output channel."""
        return self.gamma * tf.math.rsqrt(self.moving_variance + self.bn_epsilon)

    def folded_bias(self):
        """``beta + (b - moving_mean) * f`` (``b`` = the convolution's bias, or 0)."""
        b = self.bias if self.use_bias else 0.0
        return self.beta + (b - self.moving_mean) * self.bn_factor()

    def set_quantized_kernel(self, kernel):
        """Hook for a QuantizeConfig: the (folded, quantized) kernel for the next call."""
        object.__setattr__(self, "_pending_kernel", kernel)

    def _take_kernel(self):
        kernel = self._pending_kernel
        object.__setattr__(self, "_pending_kernel", None)
        return self.fold_kernel(self._float_kernel) if kernel is None else kernel

    def _update_statistics(self, inputs, training):
        """Momentum update of the moving statistics from the unfolded float output."""
        if not self.update_statistics or training is False or training is None:
            return
        z = self._raw_conv(tf.stop_gradient(inputs), tf.stop_gradient(self._float_kernel))
        if self.use_bias:
            z = z + tf.stop_gradient(self.bias)
        mean, var = tf.nn.moments(z, axes=[0, 1, 2])
        m = self.bn_momentum
        new_mean = m * self.moving_mean + (1.0 - m) * mean
        new_var = m * self.moving_variance + (1.0 - m) * var
        if not isinstance(training, bool):  # a boolean tensor: write unconditionally, select the value
            new_mean = tf.where(training, new_mean, tf.convert_to_tensor(self.moving_mean))
            new_var = tf.where(training, new_var, tf.convert_to_tensor(self.moving_variance))
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_var)

    def _folded_call(self, inputs, training):
        kernel = self._take_kernel()
        bias = self.folded_bias()  # read before the statistics update: the step folds with the old ones
        with tf.control_dependencies([kernel, bias]):
            self._update_statistics(inputs, training)
        outputs = tf.nn.bias_add(self._raw_conv(inputs, kernel), bias)
        return self.activation(outputs) if self.activation is not None else outputs

    def _bn_config(self):
        return {
            "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum,
            "bn_center": self.bn_center,
            "bn_scale": self.bn_scale,
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "update_statistics": self.update_statistics,
            "bn_name": self.bn_name,
        }


def _check_channels_last(layer):
    if layer.data_format != "channels_last":
        raise ValueError(f"{layer.name}: folded layers support data_format='channels_last' only")


@_register
class FoldedConv2D(_FoldedBatchNormMixin, keras.layers.Conv2D):
    """``Conv2D`` (+ optional bias) followed by a frozen-statistics ``BatchNormalization``.

    Takes every ``Conv2D`` argument (``groups`` must be 1, channels last) plus the BN's
    ``bn_epsilon``, ``bn_momentum``, ``bn_center``, ``bn_scale``, the gamma/beta
    regularizers and constraints, ``update_statistics`` (see the module docstring)
    and ``bn_name`` (the name of the BN it replaced, for reference).
    """

    def __init__(self, filters, kernel_size, bn_epsilon=1e-3, bn_momentum=0.99, bn_center=True, bn_scale=True,
                 gamma_regularizer=None, beta_regularizer=None, gamma_constraint=None, beta_constraint=None,
                 update_statistics=False, bn_name=None, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        if self.groups != 1:
            raise ValueError(f"{self.name}: FoldedConv2D supports groups=1 only")
        _check_channels_last(self)
        self._init_bn(bn_epsilon, bn_momentum, bn_center, bn_scale, gamma_regularizer, beta_regularizer,
                      gamma_constraint, beta_constraint, update_statistics, bn_name)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_bn(self.filters)

    @property
    def _float_kernel(self):
        return self.kernel

    def fold_kernel(self, kernel):
        """``kernel * f`` along the output channels (the last axis, HWIO)."""
        return kernel * self.bn_factor()

    def _raw_conv(self, inputs, kernel):
        return self.convolution_op(inputs, kernel)

    def call(self, inputs, training=None):
        return self._folded_call(inputs, training)

    def get_config(self):
        return {**super().get_config(), **self._bn_config()}


@_register
class FoldedDepthwiseConv2D(_FoldedBatchNormMixin, keras.layers.DepthwiseConv2D):
    """``DepthwiseConv2D`` (+ optional bias) followed by a frozen-statistics BN.

    Output channel ``c * depth_multiplier + m`` uses kernel slice ``[:, :, c, m]``; the
    fold factor is reshaped accordingly. Arguments as ``FoldedConv2D``.
    """

    def __init__(self, kernel_size, bn_epsilon=1e-3, bn_momentum=0.99, bn_center=True, bn_scale=True,
                 gamma_regularizer=None, beta_regularizer=None, gamma_constraint=None, beta_constraint=None,
                 update_statistics=False, bn_name=None, **kwargs):
        super().__init__(kernel_size, **kwargs)
        _check_channels_last(self)
        self._init_bn(bn_epsilon, bn_momentum, bn_center, bn_scale, gamma_regularizer, beta_regularizer,
                      gamma_constraint, beta_constraint, update_statistics, bn_name)

    def build(self, input_shape):
        super().build(input_shape)
        channels = int(self.depthwise_kernel.shape[2]) * self.depth_multiplier
        self._build_bn(channels)

    @property
    def _float_kernel(self):
        return self.depthwise_kernel

    def fold_kernel(self, kernel):
        """``kernel[:, :, c, m] * f[c * depth_multiplier + m]``."""
        shape = kernel.shape
        return kernel * tf.reshape(self.bn_factor(), [int(shape[2]), int(shape[3])])

    def _raw_conv(self, inputs, kernel):
        return keras.backend.depthwise_conv2d(
            inputs, kernel, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format,
        )

    def call(self, inputs, training=None):
        return self._folded_call(inputs, training)

    def get_config(self):
        return {**super().get_config(), **self._bn_config()}


# ---------------------------------------------------------------- the rewrite
_FOLDED = {keras.layers.Conv2D: FoldedConv2D, keras.layers.DepthwiseConv2D: FoldedDepthwiseConv2D}


def _check_graph_model(model, what):
    if not isinstance(model, keras.Model):
        raise ValueError(f"{what} needs a keras.Model, got {type(model).__name__}")
    if not keras_graph.is_graph_network(model):
        raise ValueError(
            f"{what} supports Functional and Sequential models built on a known input shape "
            f"(got {type(model).__name__} {model.name!r}); subclassed models have no layer graph to rewrite"
        )


def _bn_skip_reason(bn):
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if len(axis) != 1 or axis[0] not in (-1, 3):
        return f"axis={bn.axis} is not the channel axis"
    if bn.renorm or bn.virtual_batch_size is not None or bn.adjustment is not None:
        return "renorm / virtual_batch_size / adjustment are not foldable"
    return None


def foldable_pairs(model):
    """``[(conv_layer, bn_layer), ...]`` that ``fold_batchnorm`` would fold.

    A pair qualifies when the layer is exactly ``Conv2D`` (``groups=1``) or
    ``DepthwiseConv2D``, channels last, linear activation, called once in the model,
    and its only consumer is a ``BatchNormalization`` over the channel axis (no
    renorm / virtual batches / adjustment) called once. Conv + BN pairs that match
    the shape but not the conditions are reported with ``warnings.warn``.
    """
    pairs, skipped = _pairs(model)
    for layer, bn, reason in skipped:
        warnings.warn(f"not folding {layer.name} + {bn.name}: {reason}", stacklevel=3)
    return pairs


def unfoldable_pairs(model):
    """``[(conv_layer, bn_layer, reason), ...]``: the Conv + BN pairs ``fold_batchnorm``
    leaves alone (see ``foldable_pairs``), with the reason."""
    return _pairs(model)[1]


def _pairs(model):
    _check_graph_model(model, "fold_batchnorm")
    consumers = keras_graph.consumers(model)
    outputs = keras_graph.output_ids(model)
    pairs, skipped = [], []
    for node in keras_graph.nodes_in_order(model):
        layer = node.layer
        if type(layer) not in _FOLDED:
            continue
        out_ids = node.flat_output_ids
        users = consumers.get(out_ids[0], []) if len(out_ids) == 1 else []
        if len(users) != 1 or not isinstance(users[0].layer, keras.layers.BatchNormalization):
            continue
        bn = users[0].layer
        reason = None
        if getattr(layer.activation, "__name__", None) != "linear":
            reason = "the convolution has a non-linear activation"
        elif layer.data_format != "channels_last":
            reason = "data_format is channels_first"
        elif getattr(layer, "groups", 1) != 1:
            reason = "grouped convolution"
        elif len(keras_graph.inbound_nodes(layer, model)) != 1 or len(keras_graph.inbound_nodes(bn, model)) != 1:
            reason = "a layer is shared (called more than once)"
        elif out_ids[0] in outputs:
            reason = "the convolution output is also a model output"
        else:
            reason = _bn_skip_reason(bn)
        if reason:
            skipped.append((layer, bn, reason))
        else:
            pairs.append((layer, bn))
    return pairs, skipped


def _folded_layer(conv, bn, update_statistics):
    config = conv.get_config()
    config.pop("groups", None)
    folded_cls = _FOLDED[type(conv)]
    folded = folded_cls(
        **config,
        bn_epsilon=bn.epsilon,
        bn_momentum=bn.momentum,
        bn_center=bn.center,
        bn_scale=bn.scale,
        gamma_regularizer=bn.gamma_regularizer,
        beta_regularizer=bn.beta_regularizer,
        gamma_constraint=bn.gamma_constraint,
        beta_constraint=bn.beta_constraint,
        update_statistics=update_statistics,
        bn_name=bn.name,
    )
    return folded


def _transfer_weights(folded, conv, bn):
    """Copies conv kernel/bias and BN gamma/beta/mean/variance into a built folded layer."""
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    folded._float_kernel.assign(conv.depthwise_kernel if depthwise else conv.kernel)
    if conv.use_bias:
        folded.bias.assign(conv.bias)
    channels = int(folded.moving_mean.shape[0])
    folded.gamma.assign(bn.gamma if bn.scale else tf.ones([channels]))
    folded.beta.assign(bn.beta if bn.center else tf.zeros([channels]))
    folded.moving_mean.assign(bn.moving_mean)
    folded.moving_variance.assign(bn.moving_variance)


def _copy_layer(layer):
    if isinstance(layer, keras.Model):
        return keras.models.clone_model(layer)
    return layer.__class__.from_config(layer.get_config())


def rebuild_functional(model, replace=None, bypass=(), name=None, copy_layers=True):
    """Re-runs ``model``'s layer graph on new inputs, substituting layers.

    Args:
        model: a Functional / Sequential model.
        replace: ``{layer_name: new_layer}``; the new layer is called with the old
            layer's arguments.
        bypass: names of single-input layers whose output is their input (removed).
        name: the new model's name (default: the old one).
        copy_layers: give every other layer a fresh copy (from its config, weights
            copied; a shared layer stays shared) so the new model is independent of
            ``model``. ``False`` reuses the layer objects.

    Returns:
        A new ``keras.Model``.
    """
    replace = dict(replace or {})
    bypass = set(bypass)
    copies = {}

    def call_layer(layer, args, kwargs):
        if layer.name in bypass:
            return args[0]
        if layer.name in replace:
            return replace[layer.name](*args, **kwargs)
        if copy_layers and id(layer) not in copies:
            copies[id(layer)] = (layer, _copy_layer(layer))
        new = copies[id(layer)][1] if copy_layers else layer
        return new(*args, **kwargs)

    new_inputs = keras_graph.new_inputs_like(model)
    outputs = keras_graph.rerun(model, new_inputs, call_layer)
    for old, new in copies.values():
        new.set_weights(old.get_weights())
    return keras.Model(new_inputs, outputs, name=name or model.name)


def fold_batchnorm(model, update_statistics=False):
    """A new model with every foldable Conv/DepthwiseConv + BN pair folded into one layer.

    The weights are copied: the new model is independent of ``model``, and in
    inference it computes the same function (up to float rounding). The folded
    layer takes the convolution's name. See ``foldable_pairs`` for what is folded
    and the module docstring for the training semantics.

    Args:
        model: a Functional or Sequential model.
        update_statistics: whether the folded layers update their moving statistics
            in training calls (default: frozen statistics).

    Returns:
        The folded ``keras.Model`` (a copy of ``model`` if nothing was foldable).
    """
    _check_graph_model(model, "fold_batchnorm")
    pairs = foldable_pairs(model)
    replace = {conv.name: _folded_layer(conv, bn, update_statistics) for conv, bn in pairs}
    folded_model = rebuild_functional(model, replace=replace, bypass={bn.name for _, bn in pairs})
    for conv, bn in pairs:
        _transfer_weights(replace[conv.name], conv, bn)
    return folded_model
