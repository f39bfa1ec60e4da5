"""Gradient coherence statistics of a fixed sample: m-coherence, alpha, per layer.

Definitions (Chatterjee & Zielinski, "Making Coherence Out of Nothing at All";
"On the Generalization Mystery in Deep Learning"), for per-example gradients
``g_1..g_m`` of the (sample-weighted) per-example losses:

* ``m_coherence = ||sum_i g_i||^2 / sum_i ||g_i||^2`` -- between 0 and m; 1 for
  pairwise-orthogonal gradients, m for identical ones;
* ``alpha = m_coherence / m`` and the orthogonal baseline ``alpha_perp = 1 / m``;
* ``diversity = 1 / m_coherence`` (gradient diversity, Yin et al. 2018);
* per layer the same with the layer's parameters, plus the energy fraction
  ``f_l = sum_i ||g_i,l||^2 / sum_i ||g_i||^2``, so that ``alpha = sum_l f_l alpha_l``.

Regularization losses are not per-example and are left out.
"""
from __future__ import annotations

import dataclasses
import math
import re
import weakref
from typing import Dict

import numpy as np

from keras_coherence._keras import keras, loss_scaler, tf
from keras_coherence.coherence.engine import per_example_loss_fn, traced_backward
from keras_coherence.coherence.registry import var_key

BATCHNORM_MODES = ("inference", "batch")
# How far a fallback layer's per-example gradients may sum from its batch gradient, by
# the layer's compute dtype: rounding alone, not a layer that mixes examples (which is
# off by O(1)). Under mixed_bfloat16 a SimpleRNN measured 0.28%.
_FALLBACK_RTOL = {"float16": 1e-2, "bfloat16": 5e-2}
_FALLBACK_RTOL_DEFAULT = 1e-3


@dataclasses.dataclass
class LayerStats:
    m_coherence: float
    alpha: float
    energy_fraction: float
    sum_grad_sq_norm: float
    sum_sq_norms: float


@dataclasses.dataclass
class CoherenceStats:
    """Whole-model statistics and a per-layer mapping ``layers`` (name -> LayerStats)."""

    m: int
    sum_grad_sq_norm: float  # ||sum_i g_i||^2
    sum_sq_norms: float  # sum_i ||g_i||^2
    m_coherence: float
    alpha: float
    alpha_perp: float
    diversity: float
    layers: Dict[str, LayerStats]

    def as_dict(self, prefix: str = "", per_layer: bool = True) -> Dict[str, float]:
        """Flat ``{name: value}`` for logs, CSV and TensorBoard."""
        out = {f"{prefix}m_coherence": self.m_coherence, f"{prefix}alpha": self.alpha}
        if per_layer:
            for name, layer in self.layers.items():
                out[f"{prefix}m_coherence/{name}"] = layer.m_coherence
        return out


def _stats_from_sums(m, layer_s, layer_q) -> CoherenceStats:
    total_s, total_q = sum(layer_s.values()), sum(layer_q.values())
    if not math.isfinite(total_s) or not math.isfinite(total_q):
        raise FloatingPointError(
            "Non-finite gradients while computing gradient statistics: check the inputs "
            "for NaN/inf and the loss (e.g. log of 0 with from_logits=False)."
        )
    if total_q <= 0.0:
        raise ValueError(
            "Every per-example gradient is zero on this sample (loss already flat), so "
            "m-coherence is undefined."
        )
    layers = {}
    for name in layer_q:
        s, q = layer_s[name], layer_q[name]
        mc = s / q if q > 0 else float("nan")
        layers[name] = LayerStats(mc, mc / m, q / total_q, s, q)
    mc = total_s / total_q
    return CoherenceStats(m, total_s, total_q, mc, mc / m, 1.0 / m, 1.0 / mc if mc > 0 else float("inf"), layers)


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _SumLossScale:
    """Loss scaling for the summed loss of a micro-batch under ``mixed_float16``: the
    model's current dynamic loss scale divided by the micro-batch size, so that the
    float16 cotangents have the magnitudes of a training step on Keras's mean loss."""

    def __init__(self, scale):
        self.scale = scale

    @classmethod
    def of(cls, model, x):
        optimizer = loss_scaler(getattr(model, "optimizer", None))
        if optimizer is None:
            return None
        batch = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
        return cls(tf.cast(optimizer.loss_scale, tf.float32) / batch)

    def get_scaled_loss(self, loss):
        return loss * tf.cast(self.scale, loss.dtype)

    def get_unscaled_gradients(self, grads):
        return [None if g is None else g / self.scale if not isinstance(g, tf.IndexedSlices)
                else tf.IndexedSlices(g.values / self.scale, g.indices, g.dense_shape) for g in grads]


def _compiled_step(model, mode):
    """A cached ``tf.function``: micro-batch -> (per-variable summed gradients,
    per-layer summed squared norms, fallback check errors)."""
    loss_fn = per_example_loss_fn(model)  # raises a clear error when not compiled
    per_model = _CACHE.setdefault(model, {})
    key = (mode, id(getattr(model, "compiled_loss", None)), id(model.loss), id(getattr(model, "optimizer", None)))
    if key in per_model:
        return per_model[key]
    variables = list(model.trainable_variables)
    layout = {}

    @tf.function(reduce_retracing=True)
    def step(x, y, sample_weight):
        result = traced_backward(
            model, x, lambda y_pred: tf.reduce_sum(loss_fn(y, y_pred, sample_weight)), mode,
            loss_scaler=_SumLossScale.of(model, x),
        )
        layout["layer_vars"] = result.layer_vars
        grads = [result.grads.get(var_key(v)) for v in variables]
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for v, g in zip(variables, grads)]
        sq = {name: tf.reduce_sum(s) for name, s in result.layer_sq.items()}
        errors = {}
        for name, keys in result.fallback_layers.items():
            diff = tf.add_n([tf.reduce_sum(tf.square(tf.convert_to_tensor(result.grads[k]) -
                                                     tf.convert_to_tensor(result.fallback_grads[k])))
                             for k in keys])
            ref = tf.add_n([tf.reduce_sum(tf.square(tf.convert_to_tensor(result.fallback_grads[k])))
                            for k in keys])
            layer = result.by_layer[name][0].layer
            tol = _FALLBACK_RTOL.get(layer.compute_dtype, _FALLBACK_RTOL_DEFAULT)
            errors[name] = (tf.sqrt(diff) / (tf.sqrt(ref) + 1e-12), tol)
        return grads, sq, errors

    per_model[key] = (step, variables, layout)
    return per_model[key]


def _length(data, what):
    flat = tf.nest.flatten(data)
    if not flat:
        raise ValueError(f"{what} is empty.")
    lengths = {int(np.shape(t)[0]) if np.ndim(t) else None for t in flat}
    if None in lengths:
        raise ValueError(f"{what} must have a leading batch axis.")
    if len(lengths) != 1:
        raise ValueError(f"The arrays in {what} have different numbers of examples: {sorted(lengths)}.")
    return lengths.pop()


def gradient_stats(
    model,
    x,
    y,
    sample_weight=None,
    *,
    batch_size: int = 256,
    batchnorm: str = "inference",
    check_fallback: bool = True,
) -> CoherenceStats:
    """Gradient coherence statistics of the sample ``(x, y)`` at the current weights.

    The sample is streamed in micro-batches of ``batch_size`` with memory
    O(parameters): per micro-batch one backward pass gives the summed gradient and,
    through the per-layer rules, every example's squared gradient norm.

    Args:
      model: a built, compiled Keras model (Sequential or Functional for the fast path;
        any other model takes the exact but slower generic fallback).
      x, y: the sample (arrays or tensors, or nested structures for multi-input/output).
      sample_weight: optional per-example weights; example i's gradient is that of
        ``sample_weight[i] * loss_i``.
      batch_size: micro-batch size. With ``batchnorm="inference"`` only memory depends
        on it; with ``"batch"`` the statistics are those of each micro-batch, so results do.
      batchnorm: ``"inference"`` (default) -- normalization layers use their moving
        statistics, so each example's gradient is that of a fixed function; or
        ``"batch"`` -- statistics of each micro-batch, and what is measured is each
        example's contribution to the micro-batch gradient.
      check_fallback: verify on the first micro-batch that fallback layers treat
        examples independently (raise otherwise).

    Returns:
      :class:`CoherenceStats`.

    Example:
      >>> import numpy as np, keras_coherence as kc
      >>> model = kc.keras.Sequential([kc.keras.layers.Dense(3, input_shape=(4,))])
      >>> model.compile(loss="mse")
      >>> x = np.ones((5, 4), "float32"); y = np.zeros((5, 3), "float32")
      >>> round(kc.gradient_stats(model, x, y).m_coherence, 4)  # identical examples
      5.0
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}.")
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras (tf_keras) Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: give it an input shape, or call it once on "
            "data (or model.build(input_shape)) before measuring gradients."
        )
    if not model.trainable_variables:
        raise ValueError(f"Model {model.name!r} has no trainable variables.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    m = validate_sample(x, y, sample_weight)
    _check_sparse_labels(model, y)

    step, variables, layout = _compiled_step(model, batchnorm)
    sums = None
    layer_q: Dict[str, float] = {}
    for start in range(0, m, batch_size):
        sl = slice(start, min(start + batch_size, m))
        xb = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t[sl]), x)
        yb = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t[sl]), y)
        wb = None if sample_weight is None else tf.convert_to_tensor(np.asarray(sample_weight)[sl], "float32")
        try:
            grads, sq, errors = step(xb, yb, wb)
        except tf.errors.InvalidArgumentError as err:  # e.g. a label the loss rejects
            raise ValueError(
                f"Computing the per-example losses of model {model.name!r} failed: "
                f"{_op_error_summary(err.message)} Check that y matches the model's output and "
                "its compiled loss."
            ) from None
        if check_fallback and start == 0:
            for name, (err, tol) in errors.items():
                if float(err) > tol:
                    raise ValueError(
                        f"Layer {name!r} has no per-example rule and its per-example gradients do "
                        f"not add up to its batch gradient (relative error {float(err):.2g}): it "
                        "mixes examples, so per-example gradients are not defined for it. "
                        "Register a rule for it, or measure with batchnorm='inference'."
                    )
        g64 = [g.numpy().astype(np.float64) for g in grads]
        sums = g64 if sums is None else [a + b for a, b in zip(sums, g64)]
        for name, q in sq.items():
            layer_q[name] = layer_q.get(name, 0.0) + float(q)
    key_to_index = {var_key(v): i for i, v in enumerate(variables)}
    layer_s = {
        name: float(sum(np.sum(np.square(sums[key_to_index[k]])) for k in keys))
        for name, keys in layout["layer_vars"].items()
    }
    return _stats_from_sums(m, layer_s, layer_q)


def validate_sample(x, y, sample_weight=None) -> int:
    """Check a probe sample before any work; returns its number of examples.

    Raises ValueError for an empty sample, arrays of different lengths and NaN/Inf
    values (they would turn every statistic into NaN without an error)."""
    m = _length(x, "x")
    if m == 0:
        raise ValueError("The sample is empty: pass at least one example.")
    for what, data in (("y", y), ("sample_weight", sample_weight)):
        if data is not None and _length(data, what) != m:
            raise ValueError(f"x has {m} examples but {what} has {_length(data, what)}: "
                             "pass one value per example.")
    for what, data in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for t in tf.nest.flatten(data) if data is not None else []:
            values = np.asarray(t)
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                bad = int(np.size(values) - np.isfinite(values).sum())
                raise ValueError(f"{what} holds {bad} NaN or Inf value(s); clean or drop those "
                                 "examples before measuring gradients.")
    return m


_SPARSE_LOSSES = ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy")


def _check_sparse_labels(model, y):
    """Integer labels of a sparse categorical loss must lie in ``[0, classes)``: TF
    raises deep inside the graph otherwise, and on some kernels returns NaN."""
    loss = getattr(model, "loss", None)
    name = getattr(loss, "__name__", None) or type(loss).__name__
    if loss is None or (name not in _SPARSE_LOSSES and loss not in _SPARSE_LOSSES):
        return
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1 or outputs[0].shape[-1] is None:
        return
    classes = int(outputs[0].shape[-1])
    labels = np.asarray(tf.nest.flatten(y)[0])
    if labels.dtype.kind in "f" and not np.array_equal(labels, np.round(labels)):
        raise ValueError("y holds non-integer labels for a sparse categorical loss: pass "
                         "class indices.")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"y holds labels from {labels.min():g} to {labels.max():g}, but model "
            f"{model.name!r} has {classes} outputs: labels of a sparse categorical loss must "
            f"lie in [0, {classes}). Check the label encoding or the model's last layer."
        )


def _op_error_summary(message):
    """The sentence a TF op error carries, without the graph's stack trace and node names."""
    noise = ("File ", "[[", "Detected at node", "Graph execution error", "Stack trace", "[Op:")
    lines = [re.sub(r"\s*\[\[.*|\s*\[Op:.*", "", line).strip() for line in str(message).splitlines()]
    lines = [line for line in lines if line and not line.startswith(noise)]
    return lines[-1] if lines else "unknown error."
