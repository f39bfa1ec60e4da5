"""The base class of the power-of-two (PO2) weight quantizers.

A quantizer is a Keras ``Layer``: call it on a tensor, ``q(x, training=...)``. All of
its state lives in layer variables (so ``model.save`` / ``load_model`` and
``tf.train.Checkpoint`` restore it). The same code also runs on variables created by
another layer: ``create_state(shape, add_weight)`` returns the variables as a dict and
``quantize(x, training, state)`` uses them. ``TFMOTQuantizer`` relies on that to run a
quantizer inside a tfmot ``QuantizeWrapper``.

Common state (float32 variables, not trainable):

* ``exponent``: integer-valued, shape ``[1, ..., 1]`` per tensor or ``[1, ..., 1, C]``
  per channel (``C`` at ``channel_axis``). It holds the exponent of the most recent
  training call (or of ``freeze(inputs)``).
* ``initialized``: 1.0 once ``exponent`` holds a value computed from data.
* ``frozen``: 1.0 after ``freeze()``. A frozen quantizer always uses ``exponent``.

Semantics shared by every quantizer (``qp = 2**(bits - 1) - 1``):

* forward: ``Q(x) = 2**e * clip(round_half_to_even(x / 2**e), -qp, qp)``;
* gradient for ``x``: straight-through, 1 where ``round(x / 2**e)`` lies in
  ``[-qp, qp]`` and 0 where the element is clipped;
* ``training=False`` never writes state, so an inference graph is a pure function of
  the input and the variables;
* input containing NaN or Inf raises ``tf.errors.InvalidArgumentError`` (when
  ``check_numerics=True``, the default) instead of silently poisoning the state;
* a frozen quantizer satisfies ``q(x, training=False) == q.scale() * q.integer_codes(x)``;
* variables are written outside ``tf.cond`` (only pure computations are branched),
  so the quantizers train under ``tf.distribute.MirroredStrategy``.
"""
from keras_coherence._internals.tf_private import smart_cond
from keras_coherence._keras import keras, tf
from keras_coherence.quantization import _po2

_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


class PO2Quantizer(keras.layers.Layer):
    """Base class: symmetric narrow-range quantizer with a power-of-two scale.

    Args:
        bits: bit width, 2..8; the codes are ``-qp..qp`` with ``qp = 2**(bits-1) - 1``.
        per_channel: one exponent per channel (``True``) or one per tensor.
        channel_axis: the channel axis for ``per_channel`` (the last axis by default,
            i.e. the output channels of a Dense or HWIO Conv2D kernel).
        check_numerics: raise on NaN / Inf input (``tf.debugging.check_numerics``).
    """

    def __init__(self, bits=4, per_channel=False, channel_axis=-1, check_numerics=True, **kwargs):
        super().__init__(**kwargs)
        self.bits = _po2.check_bits(bits)
        self.qp = float(_po2.max_level(self.bits))
        self.per_channel = bool(per_channel)
        self.channel_axis = int(channel_axis)
        self.check_numerics = bool(check_numerics)
        # Kept out of Keras attribute tracking: the variables are tracked by add_weight.
        object.__setattr__(self, "_qstate", None)

    # ------------------------------------------------------------------ layout
    def reduce_axes(self, shape):
        """Axes that share one exponent (all axes, or all but the channel axis)."""
        rank = tf.TensorShape(shape).rank
        if rank is None:
            raise ValueError(f"{self.name}: the rank of the quantized tensor must be known")
        if not self.per_channel:
            return list(range(rank))
        return [i for i in range(rank) if i != self._channel(shape)]

    def exponent_shape(self, shape):
        shape = tf.TensorShape(shape)
        out = [1] * shape.rank
        if self.per_channel:
            axis = self._channel(shape)
            if shape[axis] is None:
                raise ValueError(f"{self.name}: per-channel quantization needs a known channel size, got {shape}")
            out[axis] = int(shape[axis])
        return out

    def _channel(self, shape):
        rank = tf.TensorShape(shape).rank
        if rank == 0 or not -rank <= self.channel_axis < rank:
            raise ValueError(f"{self.name}: channel_axis={self.channel_axis} is invalid for a tensor of rank {rank}")
        return self.channel_axis % rank

    # ------------------------------------------------------------------- state
    def create_state(self, tensor_shape, add_weight, prefix=None):
        """Creates the quantizer's variables through ``add_weight`` and returns them.

        ``add_weight`` is ``self.add_weight`` for a standalone quantizer or
        ``layer.add_weight`` of the layer that owns the quantized tensor (tfmot).
        """
        shape = tf.TensorShape(tensor_shape)
        exp_shape = self.exponent_shape(shape)

        def add(name, var_shape, value=0.0, trainable=False, aggregation=_FIRST):
            return add_weight(
                name=f"{prefix}_{name}" if prefix else name,
                shape=var_shape,
                dtype=tf.float32,
                initializer=keras.initializers.Constant(value),
                trainable=trainable,
                aggregation=aggregation,
            )

        state = {
            "exponent": add("exponent", exp_shape),
            "initialized": add("initialized", []),
            "frozen": add("frozen", []),
        }
        state.update(self._create_extra_state(shape, exp_shape, add))
        return state

    def _create_extra_state(self, shape, exp_shape, add):
        return {}

    @staticmethod
    def _m2_shape(shape):
        """Per-element second moments; unknown (batch) dimensions are averaged over."""
        return [1 if d is None else int(d) for d in shape]

    @property
    def state(self):
        """The quantizer's variables by role (a new dict; empty before ``build``)."""
        return dict(self._qstate or {})

    def _resolve(self, state):
        if state is not None:
            return state
        if self._qstate is None:
            raise ValueError(f"{self.name}: the quantizer is not built yet; call it on a tensor first")
        return self._qstate

    # ------------------------------------------------------------------- keras
    def build(self, input_shape):
        if self._qstate is None:  # idempotent: an owner layer may build it before Keras does
            object.__setattr__(self, "_qstate", self.create_state(input_shape, self.add_weight))
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python control flow here
    def call(self, inputs, training=None):
        return self.quantize(inputs, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {
            "bits": self.bits,
            "per_channel": self.per_channel,
            "channel_axis": self.channel_axis,
            "check_numerics": self.check_numerics,
        }
        return {**super().get_config(), **config}

    # ---------------------------------------------------------------- quantize
    def quantize(self, inputs, training, state=None):
        """Fake-quantizes ``inputs`` with the variables in ``state`` (default: own).

        ``training`` is a Python bool (None means False) or a boolean tensor. With
        ``training=True`` the exponent is updated and stored (unless frozen); with
        ``training=False`` nothing is written.
        """
        state = self._resolve(state)
        if training is None:
            training = False
        dtype = tf.convert_to_tensor(inputs).dtype
        x = self._prepare(inputs)
        if isinstance(training, (bool, int)):
            y, keep = self._quantize(x, bool(training), state)
            active = None if training else False
        else:  # a boolean tensor: both branches in a cond, m2 tracking outside of it
            y, keep = smart_cond(
                training, lambda: self._quantize(x, True, state), lambda: self._quantize(x, False, state)
            )
            active = training
        if active is not False and self._tracks_m2:
            y = track_second_moment(y, keep, state["m2"], self.second_moment_decay, active)
        return tf.cast(y, dtype)

    @property
    def _tracks_m2(self):
        """Whether the state has an ``m2`` updated in the backward pass of training calls."""
        return False

    def _prepare(self, inputs):
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)
        if self.check_numerics:
            x = tf.debugging.check_numerics(x, f"{self.name}: the input of the quantizer contains NaN or Inf")
        return x

    def _quantize(self, x, training, state):  # pragma: no cover - abstract
        """Returns ``(y, keep)``: the fake-quantized tensor and the float mask of
        unclipped elements (used for the second-moment update)."""
        raise NotImplementedError

    def _calibrated_exponent(self, x, state):  # pragma: no cover - abstract
        """The exponent a training step would choose for ``x`` now, with no side effects."""
        raise NotImplementedError

    @staticmethod
    def _flag(variable):
        return tf.convert_to_tensor(variable) > 0.5

    # ------------------------------------------------------------- public API
    def exponent(self, state=None):
        """The stored integer exponent(s) ``e`` (int32, the shape of the exponent variable)."""
        return tf.cast(tf.math.round(self._resolve(state)["exponent"]), tf.int32)

    def scale(self, state=None):
        """The stored scale ``2**e`` (float32, exact power of two)."""
        return _po2.pow2(tf.convert_to_tensor(self._resolve(state)["exponent"]))

    def integer_codes(self, inputs, state=None):
        """int8 codes ``clip(round(x / scale()), -qp, qp)`` with the stored exponent."""
        state = self._resolve(state)
        x = self._prepare(inputs)
        return tf.cast(_po2.codes(x, tf.convert_to_tensor(state["exponent"]), self.qp), tf.int8)

    def freeze(self, inputs=None, state=None):
        """Stops updating the exponent; every later call uses the stored one.

        With ``inputs`` the exponent is first set to what a training step would choose
        for that tensor (builds the quantizer if needed). Without it, the exponent of
        the last training call is kept, and a quantizer that never saw data raises
        ``ValueError``.
        """
        if inputs is not None and state is None and not self.built:
            self.build(tf.convert_to_tensor(inputs).shape)
        state = self._resolve(state)
        if inputs is not None:
            self._calibrate(self._prepare(inputs), state)
        elif tf.executing_eagerly() and float(state["initialized"].numpy()) < 0.5:
            raise ValueError(
                f"{self.name}: nothing to freeze yet; call the quantizer with training=True "
                "or pass the tensor to freeze(inputs)"
            )
        state["frozen"].assign(1.0)

    def unfreeze(self, state=None):
        """Resumes updating the exponent in training calls."""
        self._resolve(state)["frozen"].assign(0.0)

    def is_frozen(self, state=None):
        """Python bool (eager) telling whether the exponent is frozen."""
        return bool(float(self._resolve(state)["frozen"].numpy()) > 0.5)

    @property
    def frozen(self):
        return self.is_frozen()

    def _calibrate(self, x, state):
        state["exponent"].assign(self._calibrated_exponent(x, state))
        state["initialized"].assign(1.0)

    def _store(self, state, e):
        state["exponent"].assign(e)
        state["initialized"].assign(1.0)


def track_second_moment(y, keep, m2, decay, active=None):
    """Identity on ``y`` whose backward pass updates ``m2`` with the squared gradient.

    ``m2 <- decay * m2 + (1 - decay) * keep * g**2`` where ``g`` is the upstream
    gradient of ``y`` and ``keep`` masks out clipped elements. Axes where ``m2`` has
    size 1 but ``y`` does not (an unknown batch dimension) are averaged. The gradient
    passes through unchanged. ``active`` (a boolean tensor, or None for always)
    gates the update.
    """
    rank = y.shape.rank
    m2_shape = m2.shape

    @tf.custom_gradient
    def _identity(t):
        def grad(g):
            g2 = keep * tf.square(g)
            axes = [i for i in range(rank) if m2_shape[i] == 1 and y.shape[i] != 1]
            if axes:
                g2 = tf.reduce_mean(g2, axis=axes, keepdims=True)
            new = decay * m2 + (1.0 - decay) * g2
            if active is not None:
                new = tf.where(active, new, tf.convert_to_tensor(m2))
            m2.assign(new)
            return g

        return tf.identity(t), grad

    return _identity(y)
