"""Optimizer wrappers that aggregate over *time*: the running median of the last few
steps' gradients (RM3, Zielinski, Krishnan & Chatterjee, "Weak and Strong Gradient
Directions", 2020) and the running-average control (RA3).

They wrap any Keras optimizer and work through a plain ``model.compile(optimizer=...)``.
The ring buffer of past gradients is made of optimizer variables, so checkpoints and
``model.save`` keep it, and a resumed run makes exactly the update it would have made.
"""
from __future__ import annotations

from keras_coherence._keras import keras, tf

_MOMENTUM_KEYS = ("momentum", "beta_1", "rho_momentum")


def _momentum_of(optimizer):
    config = optimizer.get_config()
    for key in _MOMENTUM_KEYS:
        value = config.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return key, value
    return None


@keras.utils.register_keras_serializable(package="keras_coherence")
class RunningMedian(keras.optimizers.Optimizer):
    """Update with the coordinate-wise median (RM3) -- or mean (RA3, ``reduction="mean"``)
    -- of the current and the previous ``window - 1`` gradients, applied by ``inner``.

    As in the authors' code: the first step fills the whole buffer with its gradient,
    and updates start once ``window`` gradients have been seen (step ``window``);
    regularization enters the gradient before buffering. Under ``tf.distribute`` the
    median is taken of the all-reduced (global-batch) gradients.

    Args:
      inner: the optimizer that applies the aggregated gradient (instance or name).
      window: number of steps in the running median (odd; 3 is RM3).
      reduction: ``"median"`` (RM3) or ``"mean"`` (RA3, the control).
      allow_momentum: the paper found RM3 unstable with momentum, so an ``inner`` with
        momentum (``momentum`` or ``beta_1`` > 0, e.g. Adam) raises unless this is True.

    Example:
      >>> import numpy as np, keras_coherence as kc
      >>> model = kc.keras.Sequential([kc.keras.layers.Dense(2, input_shape=(3,))])
      >>> model.compile(kc.optimizers.RunningMedian(kc.keras.optimizers.SGD(0.1)), "mse")
      >>> h = model.fit(np.ones((8, 3)), np.zeros((8, 2)), batch_size=2, verbose=0)
      >>> int(model.optimizer.iterations)
      4
    """

    def __init__(self, inner="sgd", window: int = 3, reduction: str = "median",
                 allow_momentum: bool = False, name: str = "RunningMedian", **kwargs):
        kwargs.pop("jit_compile", None)  # the ring-buffer update branches; keep it out of XLA
        super().__init__(name=name, jit_compile=False, **kwargs)
        self.inner = keras.optimizers.get(inner)
        if not isinstance(self.inner, keras.optimizers.Optimizer):
            raise TypeError(
                f"RunningMedian wraps a Keras 2 optimizer (tf_keras.optimizers.Optimizer), got "
                f"{type(self.inner).__name__}; legacy optimizers are not supported.")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}.")
        if reduction not in ("median", "mean"):
            raise ValueError(f"reduction must be 'median' or 'mean', got {reduction!r}.")
        momentum = _momentum_of(self.inner)
        if momentum is not None and not allow_momentum:
            raise ValueError(
                f"The inner optimizer {type(self.inner).__name__} has momentum "
                f"({momentum[0]}={momentum[1]}); RM3 is unstable with momentum (Zielinski et al. "
                "2020), so use plain SGD (momentum=0), or pass allow_momentum=True to accept it.")
        self.window = int(window)
        self.reduction = reduction
        self.allow_momentum = allow_momentum

    # The learning rate is the inner optimizer's, so LR callbacks and schedules work.
    @property
    def learning_rate(self):
        return self.inner.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner.learning_rate = value

    @property
    def lr(self):
        return self.inner.learning_rate

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_ring_built", False):
            return
        self.inner.build(var_list)
        self._rings = [
            self.add_variable_from_reference(v, "ring", shape=[self.window, *v.shape]) for v in var_list
        ]
        self._ring_built = True

    def _aggregate(self, ring):
        if self.reduction == "mean":
            return tf.reduce_mean(ring, 0)
        if self.window == 3:  # median of three without a sort
            return tf.reduce_sum(ring, 0) - tf.reduce_max(ring, 0) - tf.reduce_min(ring, 0)
        ordered = tf.sort(ring, axis=0)
        mid = self.window // 2
        return ordered[mid] if self.window % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def update_step(self, gradient, variable):
        ring = self._rings[self._index_dict[self._var_key(variable)]]
        gradient = tf.cast(tf.convert_to_tensor(gradient), ring.dtype)
        step = self.iterations
        slot = tf.cast(step % self.window, tf.int32)
        filled = tf.cond(
            tf.equal(step, 0),
            lambda: tf.broadcast_to(gradient[None], tf.shape(ring)),
            lambda: tf.tensor_scatter_nd_update(tf.convert_to_tensor(ring), [[slot]], gradient[None]),
        )
        ring.assign(filled)
        direction = self._aggregate(filled)

        def apply():
            self.inner.update_step(direction, variable)
            return tf.constant(True)

        tf.cond(step + 1 >= self.window, apply, lambda: tf.constant(False))

    def _inner_steps(self):
        """How many updates the inner optimizer has applied before this step."""
        return tf.maximum(self.iterations - (self.window - 1), 0)

    def _compute_current_learning_rate(self):
        schedule = self.inner._learning_rate
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            # As Keras does, but at the inner optimizer's own step count.
            value = tf.convert_to_tensor(schedule(self._inner_steps()))
            if hasattr(self.inner, "_current_learning_rate"):
                self.inner._current_learning_rate.assign(value)
            else:
                self.inner._current_learning_rate = tf.Variable(
                    value, name="current_learning_rate", dtype=value.dtype, trainable=False)

    def _distributed_apply_gradients_fn(self, distribution, grads_and_vars, **kwargs):
        # The inner optimizer counts the updates it has applied (Adam's bias correction).
        self.inner.iterations.assign(self._inner_steps())
        return super()._distributed_apply_gradients_fn(distribution, grads_and_vars, **kwargs)

    @property
    def variables(self):
        return list(self._variables) + list(self.inner.variables)

    def get_config(self):
        config = super().get_config()
        for key in ("learning_rate", "jit_compile", "is_legacy_optimizer"):
            config.pop(key, None)
        config.update({
            "inner": keras.optimizers.serialize(self.inner),
            "window": self.window,
            "reduction": self.reduction,
            "allow_momentum": self.allow_momentum,
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["inner"] = keras.optimizers.deserialize(config["inner"], custom_objects=custom_objects)
        return cls(**config)


def RunningAverage(inner="sgd", window: int = 3, **kwargs) -> RunningMedian:
    """RA3, the control of RM3: the plain average of the last ``window`` gradients."""
    return RunningMedian(inner, window=window, reduction="mean", name=kwargs.pop("name", "RunningAverage"),
                         **kwargs)
