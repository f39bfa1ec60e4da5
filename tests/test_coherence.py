"""gradient_stats against brute force (one example at a time with tape.gradient)."""
import warnings

import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence._keras import keras, tf
from keras_coherence.coherence import gradient_stats, rule_for
from reference import coherence_reference, layer_map

RTOL = 1e-4


class Scale(keras.layers.Layer):
    """A layer with weights and no rule: takes the generic fallback."""

    def build(self, input_shape):
        self.w = self.add_weight("w", shape=input_shape[-1:], initializer="random_normal")
        self.c = self.add_weight("c", shape=input_shape[-1:], initializer="random_normal")

    def call(self, x):
        return tf.tanh(x * (1.0 + self.w)) + self.c


class BatchMixer(keras.layers.Layer):
    """Mixes examples (subtracts the batch mean): per-example gradients are undefined."""

    def build(self, input_shape):
        self.w = self.add_weight("w", shape=input_shape[-1:], initializer="ones")

    def call(self, x):
        return (x - tf.reduce_mean(x, 0, keepdims=True)) * self.w


def _assert_matches(model, loss_fn, x, y, sample_weight=None, batch_size=7):
    stats = gradient_stats(model, x, y, sample_weight, batch_size=batch_size)
    ref_mc, ref_s, ref_q, ref_layers = coherence_reference(model, loss_fn, x, y, sample_weight,
                                                           layer_map(model))
    np.testing.assert_allclose(stats.m_coherence, ref_mc, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_grad_sq_norm, ref_s, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_sq_norms, ref_q, rtol=RTOL)
    assert set(stats.layers) == set(ref_layers)
    for name, value in ref_layers.items():
        np.testing.assert_allclose(stats.layers[name].m_coherence, value, rtol=RTOL, err_msg=name)
    # alpha is the energy-weighted mean of the per-layer alphas
    np.testing.assert_allclose(
        sum(l.energy_fraction * l.alpha for l in stats.layers.values()), stats.alpha, rtol=1e-6)
    assert stats.alpha_perp == pytest.approx(1.0 / len(y))
    assert stats.m == len(y)
    return stats


def _randomize_bn(model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=c).astype("float32"))
            layer.beta.assign(rng.normal(size=c).astype("float32"))


def test_mixed_image_model_every_rule_and_fallback(monkeypatch):
    from keras_coherence.coherence.rules import fallback

    monkeypatch.setattr(fallback.FALLBACK, "chunk_size", 3)  # micro-batches of 7: chunks 3+3+1
    rng = np.random.default_rng(0)
    x = rng.normal(size=(19, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 19)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(h)
    h = keras.layers.SeparableConv2D(9, 3, padding="valid", activation="elu")(h)  # next conv: 36 inputs
    h = keras.layers.Conv2D(4, 2, dilation_rate=1, strides=1, padding="valid")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(7, activation="tanh")(h)
    h = keras.layers.LayerNormalization()(h)
    h = Scale()(h)
    out = keras.layers.Dense(4)(h)
    model = keras.Model(inp, out)
    _randomize_bn(model, rng)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    with pytest.warns(UserWarning, match="scale"):
        stats = _assert_matches(model, loss, x, y)
    assert len(stats.layers) == 9


def test_strided_dilated_conv_and_same_padding():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 11, 10, 2)).astype("float32")
    y = rng.normal(size=(9, 3)).astype("float32")
    inp = keras.Input((11, 10, 2))
    h = keras.layers.Conv2D(4, (3, 2), strides=(2, 3), padding="same")(inp)  # next conv: 36 inputs
    h = keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", activation="sigmoid")(h)
    h = keras.layers.DepthwiseConv2D(2, strides=2, padding="same")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(3)(h)
    model = keras.Model(inp, out)
    model.compile(loss="mse")
    _assert_matches(model, keras.losses.MeanSquaredError(), x, y, batch_size=4)


def test_sequence_model_embedding_conv1d_dense3d():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 12, size=(13, 9))
    x[:, 3] = x[:, 1]  # repeated tokens inside an example exercise the Gram mask
    y = rng.integers(0, 3, 13)
    inp = keras.Input((9,), dtype="int32")
    h = keras.layers.Embedding(12, 6)(inp)
    h = keras.layers.Conv1D(5, 3, padding="causal", dilation_rate=2, activation="relu")(h)
    h = keras.layers.Conv1D(4, 2, strides=2, padding="same")(h)
    h = keras.layers.Dense(4, activation="tanh")(h)  # Dense on [B, T, C]
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(inp, out)
    model.compile(loss="sparse_categorical_crossentropy")
    _assert_matches(model, keras.losses.SparseCategoricalCrossentropy(), x, y)


def test_larq_quantized_layers_through_ste():
    import larq as lq

    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, 10)
    inp = keras.Input((6, 6, 2))
    h = lq.layers.QuantConv2D(4, 3, padding="same", pad_values=1.0, input_quantizer="ste_sign",
                              kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                              use_bias=False)(inp)
    h = keras.layers.BatchNormalization()(h)
    h = lq.layers.QuantConv2D(4, 3, strides=2, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                              kernel_constraint="weight_clip")(h)  # 36 inputs: per-offset path
    h = keras.layers.Flatten()(h)
    h = lq.layers.QuantDense(5, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                             kernel_constraint="weight_clip")(h)
    out = lq.layers.QuantDense(3, kernel_quantizer="magnitude_aware_sign")(h)
    model = keras.Model(inp, out)
    _randomize_bn(model, rng)
    for v in model.trainable_variables:  # latent weights on both sides of the STE clip
        if len(v.shape) > 1:
            v.assign(rng.normal(scale=1.2, size=v.shape).astype("float32"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    for layer in model.layers:
        if layer.trainable_weights:
            assert rule_for(layer)[0] is not None, layer.name
    _assert_matches(model, loss, x, y)


def test_nested_model_shared_layer_and_sample_weights():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(11, 5)).astype("float32")
    y = rng.integers(0, 2, 11)
    w = rng.uniform(0.1, 2.0, size=11).astype("float32")
    inner = keras.Sequential([keras.layers.Dense(6, activation="relu", input_shape=(5,), name="a"),
                              keras.layers.Dense(5, name="b")], name="inner")
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    inp = keras.Input((5,))
    h = shared(inner(inp))
    h = shared(h)  # same layer twice: per-example gradient is the sum over both calls
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    with pytest.warns(UserWarning, match="more than once"):
        stats = _assert_matches(model, loss, x, y, sample_weight=w)
    assert set(stats.layers) == {"inner/a", "inner/b", "shared", "head"}


def test_subclassed_model_takes_whole_model_fallback():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = keras.layers.Dense(4, activation="relu")
            self.d2 = keras.layers.Dense(3)

        def call(self, x):
            return self.d2(self.d1(x))

    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 3)).astype("float32")
    y = rng.integers(0, 3, 6)
    model = Net()
    model(x[:1])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    stats = gradient_stats(model, x, y)
    ref_mc, _, _, _ = coherence_reference(model, loss, x, y)
    np.testing.assert_allclose(stats.m_coherence, ref_mc, rtol=RTOL)


def test_regression_loss_with_flat_targets_and_single_output_unit():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(12, 4)).astype("float32")
    y = rng.normal(size=12).astype("float32")  # [B] targets, [B, 1] predictions
    model = keras.Sequential([keras.layers.Dense(6, activation="relu", input_shape=(4,)),
                              keras.layers.Dense(1)])
    model.compile(loss="mse")
    _assert_matches(model, keras.losses.MeanSquaredError(), x, y)


def _dense_model(n_in=4, n_out=3):
    model = keras.Sequential([keras.layers.Dense(5, activation="relu", input_shape=(n_in,)),
                              keras.layers.Dense(n_out)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_one_example_gives_one_and_identical_examples_give_m():
    model = _dense_model()
    x = np.random.default_rng(6).normal(size=(1, 4)).astype("float32")
    assert gradient_stats(model, x, np.array([1])).m_coherence == pytest.approx(1.0, rel=1e-6)
    xs = np.repeat(x, 8, axis=0)
    stats = gradient_stats(model, xs, np.ones(8, int), batch_size=3)
    assert stats.m_coherence == pytest.approx(8.0, rel=1e-5)
    assert stats.alpha == pytest.approx(1.0, rel=1e-5)


def test_micro_batch_size_does_not_change_results():
    rng = np.random.default_rng(7)
    model = _dense_model()
    x = rng.normal(size=(37, 4)).astype("float32")
    y = rng.integers(0, 3, 37)
    a = gradient_stats(model, x, y, batch_size=37)
    b = gradient_stats(model, x, y, batch_size=5)
    assert a.m_coherence == pytest.approx(b.m_coherence, rel=1e-5)


def test_batchnorm_batch_mode_gives_per_example_contributions():
    """In batch mode, the reported per-example quantities are each example's contribution
    to the batch gradient: checked with explicit per-example parameter copies."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(9, 4)).astype("float32")
    y = rng.integers(0, 3, 9)
    inp = keras.Input((4,))
    h = keras.layers.Dense(5)(inp)
    h = keras.layers.BatchNormalization(epsilon=1e-3)(h)
    out = keras.layers.Dense(3)(h)
    model = keras.Model(inp, out)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stats = gradient_stats(model, x, y, batchnorm="batch", batch_size=9)

    d1, bn, d2 = model.layers[1], model.layers[2], model.layers[3]
    params = [d1.kernel, d1.bias, bn.gamma, bn.beta, d2.kernel, d2.bias]
    copies = [tf.Variable(tf.zeros((9,) + tuple(p.shape))) for p in params]
    with tf.GradientTape() as tape:
        k1, b1, g, b, k2, b2 = [p[None] + c for p, c in zip(params, copies)]
        z = tf.einsum("bi,bio->bo", x, k1) + b1
        mean, var = tf.nn.moments(z, [0])
        h = (z - mean) / tf.sqrt(var + 1e-3) * g + b
        logits = tf.einsum("bi,bio->bo", h, k2) + b2
        total = tf.reduce_sum(loss(y, logits))
    contrib = tape.gradient(total, copies)
    flat = np.concatenate([c.numpy().reshape(9, -1) for c in contrib], axis=1).astype(np.float64)
    s = flat.sum(0)
    np.testing.assert_allclose(stats.sum_grad_sq_norm, s @ s, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_sq_norms, (flat * flat).sum(), rtol=RTOL)
    # and measuring never touches the moving statistics
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(5, "float32"))


def test_layer_that_mixes_examples_is_refused():
    inp = keras.Input((3,))
    out = keras.layers.Dense(2)(BatchMixer()(inp))
    model = keras.Model(inp, out)
    model.compile(loss="mse")
    x = np.random.default_rng(9).normal(size=(6, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="mixes examples"):
            gradient_stats(model, x, np.zeros((6, 2), "float32"))


@pytest.mark.parametrize("case, error, match", [
    ("unbuilt", ValueError, "not built"),
    ("no_loss", ValueError, "compile"),
    ("mismatch", ValueError, "examples"),
    ("empty", ValueError, "empty|at least one"),
    ("nan", ValueError, "x holds 1 NaN or Inf"),
    ("inf_weight", FloatingPointError, "Non-finite"),
    ("label_too_large", ValueError, r"labels from 0 to 7, but model .* has 3 outputs"),
    ("negative_label", ValueError, r"must lie in \[0, 3\)"),
    ("fractional_label", ValueError, "non-integer labels"),
    ("nan_sample_weight", ValueError, "sample_weight holds 1 NaN"),
    ("short_sample_weight", ValueError, "sample_weight has 3"),
    ("bad_mode", ValueError, "batchnorm"),
])
def test_bad_input_gets_clear_error(case, error, match):
    x = np.ones((4, 4), "float32")
    y = np.zeros(4, int)
    model = _dense_model()
    if case == "unbuilt":
        model = keras.Sequential([keras.layers.Dense(2)])
        model.compile(loss="mse")
    elif case == "no_loss":
        model = keras.Sequential([keras.layers.Dense(2, input_shape=(4,))])
    elif case == "mismatch":
        y = np.zeros(3, int)
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "nan":
        x = x.copy()
        x[1, 2] = np.nan
    elif case == "inf_weight":
        kernel = model.layers[-1].kernel
        kernel.assign(np.where(np.arange(kernel.shape[0])[:, None] == 1, np.inf, kernel.numpy()))
    elif case == "label_too_large":
        y = np.array([0, 1, 7, 1])
    elif case == "negative_label":
        y = np.array([0, -1, 1, 1])
    elif case == "fractional_label":
        y = np.array([0.0, 0.5, 1.0, 1.0])
    sw = {"nan_sample_weight": np.array([1.0, np.nan, 1.0, 1.0]),
          "short_sample_weight": np.ones(3)}.get(case)
    with pytest.raises(error, match=match):
        gradient_stats(model, x, y, sw, batchnorm="nope" if case == "bad_mode" else "inference")


def test_registry_refuses_subclass_that_overrides_call():
    class MyDense(keras.layers.Dense):
        def call(self, x):
            return super().call(x) * 2.0

    class PlainSubclass(keras.layers.Dense):
        pass

    assert rule_for(MyDense(3))[0] is None
    assert "overrides call" in rule_for(MyDense(3))[1]
    assert rule_for(PlainSubclass(3))[0] is not None


def test_registering_a_second_rule_for_a_type_raises_unless_replace():
    from keras_coherence.coherence import registry
    from keras_coherence.coherence.rules.dense import DenseRule

    original = registry.RULES[keras.layers.Dense]

    class OtherDenseRule(DenseRule):
        pass

    with pytest.raises(ValueError, match=r"Dense already has the rule DenseRule.*register\(replace=True\)"):
        registry.register(OtherDenseRule)
    assert registry.RULES[keras.layers.Dense] is original
    try:
        registry.register(replace=True)(OtherDenseRule)
        assert type(rule_for(keras.layers.Dense(2))[0]) is OtherDenseRule
    finally:
        registry.RULES[keras.layers.Dense] = original


def test_label_errors_for_string_and_custom_losses():
    """A string loss is checked before any work; a custom loss that rejects a label
    inside the graph gives one clear ValueError, not a graph dump."""
    x = np.ones((4, 4), "float32")
    y = np.array([0, 1, 9, 2])
    model = keras.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    model.compile(loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"labels from 0 to 9, but model .* has 3 outputs"):
        gradient_stats(model, x, y)
    model.compile(loss=lambda t, p: keras.losses.sparse_categorical_crossentropy(t, p, from_logits=True))
    with pytest.raises(ValueError, match=r"per-example losses of model .* failed: .*label value of 9"):
        gradient_stats(model, x, y)


def test_monitor_refuses_a_bad_probe_sample_at_construction():
    x = np.ones((5, 4), "float32")
    with pytest.raises(ValueError, match="x has 5 examples but y has 4"):
        kc.callbacks.CoherenceMonitor(x, np.zeros(4, int))
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="x holds 1 NaN or Inf"):
        kc.callbacks.CoherenceMonitor(bad, np.zeros(5, int))
