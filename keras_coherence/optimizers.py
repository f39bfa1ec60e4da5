"""Optimizer wrappers that aggregate over *time*: the running median of the last few
steps' gradients (RM3, Zielinski, Krishnan & Chatterjee, "Weak and Strong Gradient
Directions", 2020) and the running-average control (RA3).

They wrap any Keras optimizer and work through a plain ``model.compile(optimizer=...)``.
The ring buffer of past gradients is made of optimizer variables, so checkpoints and
``model.save`` (``.keras`` and ``.h5``) keep it, and a resumed run makes exactly the
update it would have made.
"""
from __future__ import annotations

from keras_coherence._internals.keras_private import (
    can_jit_compile, optimizer_built, set_current_learning_rate, variables_not_built_for,
)
from keras_coherence._keras import keras, tf
from keras_coherence.aggregation.aggregators import coordinate_median, integer_arg


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

    One instance serves one model (its ring buffer is shaped after that model's
    weights): compiling it, or its ``inner`` optimizer, into a second model raises a
    ValueError at that model's first step.

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
                 allow_momentum: bool = False, name: str = "RunningMedian", jit_compile: bool = True,
                 **kwargs):
        super().__init__(name=name, jit_compile=jit_compile, **kwargs)
        # Keras turns XLA off without a GPU; here it pays on CPU too: one fused pass does
        # the slot write, the median and the inner update (measured: RM3's extra cost on
        # the benchmark MLP falls by about 3x).
        self.jit_compile = bool(jit_compile) and can_jit_compile()
        self.inner = keras.optimizers.get(inner)
        if not isinstance(self.inner, keras.optimizers.Optimizer):
            raise TypeError(
                f"RunningMedian wraps a Keras 2 optimizer (tf_keras.optimizers.Optimizer), got "
                f"{type(self.inner).__name__}; legacy optimizers are not supported.")
        window = integer_arg(window, "RunningMedian", "window", 1)
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
        if optimizer_built(self):
            self._check_owns(self, var_list)
            return
        if optimizer_built(self.inner):
            self._check_owns(self.inner, var_list)
        super().build(var_list)
        self.inner.build(var_list)
        self._rings = [
            self.add_variable_from_reference(v, "ring", shape=[self.window, *v.shape]) for v in var_list
        ]
        # Keras's flag for "built" (set_weights, as used by .h5 loading, needs it).
        self._built = True

    def _check_owns(self, optimizer, var_list):
        """A clear error, instead of a bare KeyError, for variables ``optimizer`` (this one
        or its inner optimizer) was not built for: one instance used by two models."""
        foreign = variables_not_built_for(optimizer, var_list)
        if not foreign:
            return
        which = ("This RunningMedian" if optimizer is self
                 else f"The inner optimizer {type(optimizer).__name__} of this RunningMedian")
        raise ValueError(
            f"{which} was built for other variables (another model's), not for {foreign[0]!r}: "
            "create one optimizer per model -- a new RunningMedian(...) with a new inner optimizer "
            "for each model you compile -- and compile again with a new optimizer after changing "
            "which weights are trainable.")

    def update_step(self, gradient, variable):
        ring = self._rings[self._index_dict[self._var_key(variable)]]
        gradient = tf.cast(tf.convert_to_tensor(gradient), ring.dtype)
        step = self.iterations
        # Step t writes slot t % window, in place. (The authors' code also fills every
        # slot with the first gradient; that changes nothing, since no update is applied
        # before step window - 1, when every slot holds a real gradient.)
        slot = tf.cast(step % self.window, tf.int32)
        ring.scatter_update(tf.IndexedSlices(gradient[None], slot[None]))
        values = tf.unstack(tf.convert_to_tensor(ring), axis=0)  # read after the write
        if self.reduction == "mean":
            direction = tf.add_n(values) / self.window
        else:
            direction = coordinate_median(values)

        def apply():
            self.inner.update_step(direction, variable)
            return tf.constant(True)

        tf.cond(step + 1 >= self.window, apply, lambda: tf.constant(False))

    def _inner_steps(self):
        """How many updates the inner optimizer has applied before this step."""
        return tf.maximum(self.iterations - (self.window - 1), 0)

    def _compute_current_learning_rate(self):
        # As Keras does, but at the inner optimizer's own step count.
        set_current_learning_rate(self.inner, self._inner_steps)

    def _distributed_apply_gradients_fn(self, distribution, grads_and_vars, **kwargs):
        # The inner optimizer counts the updates it has applied (Adam's bias correction).
        self.inner.iterations.assign(self._inner_steps())
        return super()._distributed_apply_gradients_fn(distribution, grads_and_vars, **kwargs)

    @property
    def variables(self):
        # The inner optimizer's step counter is left out: it is derived (set from
        # ``iterations`` before every update), and as a second variable named
        # "iteration" it would make the .h5 format fail (names must be unique).
        inner_step = self.inner.iterations
        return list(self._variables) + [v for v in self.inner.variables if v is not inner_step]

    def set_weights(self, weights):
        """Set the ring buffer, step counter and inner optimizer's state from values in
        the order of :attr:`variables` (as ``.h5`` loading does)."""
        variables = self.variables
        if not optimizer_built(self):
            raise ValueError("RunningMedian.set_weights needs a built optimizer: call "
                             "optimizer.build(model.trainable_variables) first.")
        if len(weights) != len(variables):
            raise ValueError(f"RunningMedian.set_weights got {len(weights)} values for {len(variables)} "
                             "variables (ring buffer, step counter, inner optimizer's slots); they must "
                             "come from the same kind of optimizer on the same model.")
        for variable, weight in zip(variables, weights):
            if tuple(variable.shape) != tuple(weight.shape):
                raise ValueError(f"RunningMedian.set_weights: {variable.name} has shape "
                                 f"{tuple(variable.shape)}, got a value of shape {tuple(weight.shape)}.")
            variable.assign(weight)

    def load_own_variables(self, store):
        # .keras files written before the inner step counter left `variables` hold it
        # right after this optimizer's own variables: skip it.
        if len(store.keys()) == len(self.variables) + 1 and len(self.inner.variables) > 0:
            own = len(self._variables)
            values = [store[str(i)] for i in range(len(store.keys())) if i != own]
            for variable, value in zip(self.variables, values):
                variable.assign(value)
            return
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        for key in ("learning_rate", "is_legacy_optimizer"):
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
