"""Coherence statistics and robust aggregation under Keras mixed precision
(``mixed_float16`` with its dynamic loss scaling, and ``mixed_bfloat16``), against a
float32 brute force: the same weights in a float32 copy of the model, one example at a
time through ``tf.GradientTape``, then numpy in float64.

Tolerances (relative, on m-coherence, per-layer m-coherence and squared norms; on
updates, relative to the update's size) are what the compute dtype allows: the forward
pass and the backward pass to each layer's output run in 16 bits, with unit roundoff
2^-11 for float16 and 2^-8 for bfloat16. The largest errors measured on these models were
0.12% (float16) and 1.7% (bfloat16, the conv layer's own m-coherence), as large as those
of the same brute force run in the 16-bit model itself; the tolerances are ``RTOL``.
Updates are compared as one vector, to ``UPDATE_RTOL`` of its norm; measured: float16 at
most 0.42%, bfloat16 at most 6.0% (mean gradient 3.9%, winsorized 5.4%, M3 5.9%, all on
the conv net, whose kernel gradient sums 36 products of 16-bit activations per example).
"""
import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence._keras import keras
from keras_coherence.aggregation import with_aggregator
from keras_coherence.coherence.train_step import with_coherence

from reference import coherence_reference, layer_map

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RTOL = {"mixed_float16": 5e-3, "mixed_bfloat16": 5e-2}
UPDATE_RTOL = {"mixed_float16": 2e-2, "mixed_bfloat16": 1.2e-1}
LR = 0.1


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _conv_net():
    inp = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="tanh", name="dense")(h)
    out = keras.layers.Dense(3, dtype="float32", name="logits")(h)  # Keras's advice: float32 logits
    return keras.Model(inp, out)


def _attention_net():
    inp = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(12, 8, embeddings_initializer="random_normal", name="embed")(inp)
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 6), bias_axes="d",
                                 activation="tanh", name="ffn")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(3, dtype="float32", name="logits")(h)
    return keras.Model(inp, out)


BUILDERS = {"conv": _conv_net, "attention": _attention_net}


def _data(kind, n=16, scale=1.0):
    rng = np.random.default_rng(3)
    if kind == "attention":
        x = rng.integers(0, 12, size=(n, 6)).astype("int32")
    else:
        x = (scale * rng.normal(size=(n, 8, 8, 2))).astype("float32")
    return x, (np.arange(n) % 3).astype("int32")


def _pair(kind, policy):
    """The model under ``policy`` (compiled: Keras wraps SGD in a LossScaleOptimizer
    under mixed_float16) and a float32 copy with the same weights."""
    keras.utils.set_random_seed(0)
    model = BUILDERS[kind]()
    model.compile(keras.optimizers.SGD(LR), LOSS)
    keras.mixed_precision.set_global_policy("float32")
    reference = BUILDERS[kind]()
    reference.set_weights(model.get_weights())
    keras.mixed_precision.set_global_policy(policy)
    return model, reference


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_gradient_stats_match_float32_brute_force(policy, kind):
    model, reference = _pair(kind, policy)
    assert model.get_layer("dense" if kind == "conv" else "ffn").compute_dtype != "float32"
    x, y = _data(kind)
    stats = kc.gradient_stats(model, x, y)
    m, s, q, per_layer = coherence_reference(reference, LOSS, x, y, layer_of=layer_map(reference))
    assert _rel(stats.m_coherence, m) < RTOL[policy]
    assert _rel(stats.sum_sq_norms, q) < RTOL[policy]
    assert _rel(stats.sum_grad_sq_norm, s) < RTOL[policy]
    for name, value in per_layer.items():
        assert _rel(stats.layers[name].m_coherence, value) < RTOL[policy], name


def test_per_example_norms_accumulate_in_float32():
    """Inputs of size ~30: a float16 squared norm of a layer's input would overflow
    (float16's largest value is 65504); accumulated in float32 the norms are right."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, reference = _pair("conv", "mixed_float16")
        x, y = _data("conv", scale=30.0)
        a = x.reshape(len(x), -1)
        assert np.isinf(np.sum(np.float16(a) ** 2, axis=1, dtype=np.float16)).all()  # the hazard
        stats = kc.gradient_stats(model, x, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    m, s, q, _ = coherence_reference(reference, LOSS, x, y)
    assert np.isfinite(stats.sum_sq_norms)
    assert _rel(stats.sum_sq_norms, q) < RTOL["mixed_float16"]
    assert _rel(stats.m_coherence, m) < RTOL["mixed_float16"]


def test_loss_scaling_keeps_small_gradients():
    """A loss weighted by 1e-7: the float16 cotangents of the unscaled loss are below
    float16's normal range and lose their digits; with the LossScaleOptimizer that Keras
    compiles under mixed_float16 they are scaled up first, and the statistics are right.
    The same model compiled with a plain optimizer (no loss scale) shows the damage."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, reference = _pair("conv", "mixed_float16")
        model.compile(keras.optimizers.SGD(LR), LOSS, loss_weights=[1e-7])
        assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        x, y = _data("conv")
        scaled = kc.gradient_stats(model, x, y)
        model.optimizer = keras.optimizers.SGD(LR)  # no loss scaling
        unscaled = kc.gradient_stats(model, x, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    weighted = lambda yt, yp: 1e-7 * LOSS(yt, yp)  # noqa: E731
    m, s, q, _ = coherence_reference(reference, weighted, x, y)
    assert _rel(scaled.sum_sq_norms, q) < RTOL["mixed_float16"]
    assert _rel(scaled.m_coherence, m) < RTOL["mixed_float16"]
    assert _rel(unscaled.sum_sq_norms, q) > 10 * RTOL["mixed_float16"]


def _sgd_step(reference, x, y, direction_fn):
    """Weights after one SGD step of the float32 reference along ``direction_fn`` of the
    per-example gradients of the mean loss (``[B, ...]`` per variable, float64)."""
    from reference import per_example_grads

    grads = per_example_grads(reference, LOSS, x, y, training=True)
    per_var = [np.stack([g[j] for g in grads]) / len(y) for j in range(len(grads[0]))]
    return [v.numpy() - LR * direction_fn(g) for v, g in zip(reference.trainable_variables, per_var)]


def _assert_update(model, before, expected, rtol):
    """The update of all weights together is the expected one, to ``rtol`` of its norm."""
    step = np.concatenate([(v.numpy() - b).ravel() for v, b in zip(model.trainable_variables, before)])
    want = np.concatenate([(e - b).ravel() for e, b in zip(expected, before)])
    assert np.linalg.norm(step - want) <= rtol * np.linalg.norm(want)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_coherence_model_trains_like_float32(policy, kind):
    """One step of with_coherence: the logged m-coherence is the float32 one at the
    pre-update weights, and the update is the mean gradient's (loss scale undone)."""
    model, reference = _pair(kind, policy)
    x, y = _data(kind)
    m, _, _, _ = coherence_reference(reference, LOSS, x, y)
    expected = _sgd_step(reference, x, y, lambda g: g.sum(0))
    cmodel = with_coherence(model)
    cmodel.compile(keras.optimizers.SGD(LR), LOSS)
    before = [v.numpy() for v in model.trainable_variables]
    logs = cmodel.train_on_batch(x, y, return_dict=True)
    assert _rel(logs["m_coherence"], m) < RTOL[policy]
    _assert_update(model, before, expected, UPDATE_RTOL[policy])


def test_coherence_monitor_under_mixed_precision(policy):
    model, reference = _pair("conv", policy)
    x, y = _data("conv")
    monitor = kc.callbacks.CoherenceMonitor(x, y)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[monitor])
    reference.set_weights(model.get_weights())  # the monitor measured the end-of-epoch weights
    m, _, _, _ = coherence_reference(reference, LOSS, x, y)
    assert _rel(monitor.history[-1]["m_coherence"], m) < RTOL[policy]


def _winsorized(g, c=2):
    s = np.sort(g, axis=0)
    return np.clip(g, s[c], s[len(g) - 1 - c]).sum(0)


def _m3(g, groups=4):
    sums = [g[idx].sum(0) * len(g) / len(idx) for idx in np.array_split(np.arange(len(g)), groups)]
    return np.median(np.stack(sums), axis=0)


@pytest.mark.parametrize("spec, direction", [("winsorized:c=2", _winsorized), ("m3:groups=4", _m3)])
def test_aggregators_under_mixed_precision(policy, spec, direction):
    model, reference = _pair("conv", policy)
    x, y = _data("conv")
    expected = _sgd_step(reference, x, y, direction)
    amodel = with_aggregator(model, spec)
    amodel.compile(keras.optimizers.SGD(LR), LOSS)
    if policy == "mixed_float16":
        assert isinstance(amodel.optimizer, keras.mixed_precision.LossScaleOptimizer)
    before = [v.numpy() for v in model.trainable_variables]
    amodel.train_on_batch(x, y)
    _assert_update(model, before, expected, UPDATE_RTOL[policy])


def test_running_median_under_mixed_precision(policy):
    """RM3 (an optimizer: Keras's own step unscales the gradients before it buffers
    them) moves the weights as in float32 over 8 steps; RM3's float32 steps are checked
    against numpy in test_optimizers.py."""
    x, y = _data("conv", n=32)
    moved = {}
    for name in ("float32", policy):
        keras.mixed_precision.set_global_policy(name)
        keras.utils.set_random_seed(0)
        model = _conv_net()
        model.compile(kc.optimizers.RunningMedian(keras.optimizers.SGD(LR)), LOSS)
        if name == "mixed_float16":
            assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        before = [w.copy() for w in model.get_weights()]
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        moved[name] = np.concatenate([(w - b).ravel() for w, b in zip(model.get_weights(), before)])
    keras.mixed_precision.set_global_policy(policy)
    err = np.linalg.norm(moved[policy] - moved["float32"])
    # 8 steps compound one step's error (measured 2.5% for float16)
    assert 0 < err <= 3 * UPDATE_RTOL[policy] * np.linalg.norm(moved["float32"])


def test_fallback_layer_and_16_bit_logits(policy):
    """A layer without a rule (SimpleRNN: the generic per-example VJPs, run in the
    layer's 16-bit dtype) and logits left in the 16-bit dtype: both statistics still
    match float32. (The fallback's sum check allows the dtype's rounding: 0.28% was
    measured under bfloat16, above the float32 threshold of 0.1%.)"""
    def build():
        inp = keras.Input((5, 3))
        h = keras.layers.SimpleRNN(6, name="rnn")(inp)
        return keras.Model(inp, keras.layers.Dense(3, name="logits")(h))

    keras.utils.set_random_seed(0)
    model = build()
    model.compile(keras.optimizers.SGD(LR), LOSS)
    keras.mixed_precision.set_global_policy("float32")
    reference = build()
    reference.set_weights(model.get_weights())
    keras.mixed_precision.set_global_policy(policy)
    x = np.random.default_rng(0).normal(size=(12, 5, 3)).astype("float32")
    y = np.arange(12) % 3
    m, _, _, _ = coherence_reference(reference, LOSS, x, y)
    with pytest.warns(UserWarning, match="fallback"):
        stats = kc.gradient_stats(model, x, y)
    assert _rel(stats.m_coherence, m) < RTOL[policy]
    cmodel = with_coherence(model)
    cmodel.compile(keras.optimizers.SGD(LR), LOSS)
    assert _rel(cmodel.train_on_batch(x, y, return_dict=True)["m_coherence"], m) < RTOL[policy]
