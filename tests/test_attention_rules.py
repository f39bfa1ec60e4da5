"""EinsumDense and MultiHeadAttention rules against one example at a time.

The reference (tests/reference.py) differentiates each example's loss alone with
``tf.GradientTape``; the rules must give the same per-example squared norms, batch
gradients and m-coherence, without the generic fallback.
"""
import warnings

import numpy as np
import pytest

import keras_coherence as kc  # noqa: F401  (Keras 2 first)
from keras_coherence._keras import keras, tf
from keras_coherence.coherence import engine, gradient_stats
from keras_coherence.coherence.registry import rule_for
from keras_coherence.coherence.rules.attention import MultiHeadAttentionRule
from keras_coherence.coherence.rules.einsum import EinsumDenseRule, EinsumLayout
from reference import coherence_reference, layer_map, per_example_grads

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RTOL = 1e-4


def _check_against_reference(model, x, y, batch_size=None):
    model.compile(loss=LOSS)
    with warnings.catch_warnings():  # the fallback's one-time warning is an error here
        warnings.filterwarnings("error", message=".*generic per-example-gradient fallback.*")
        stats = gradient_stats(model, x, y, batch_size=batch_size or len(y))
    ref_mc, ref_s, ref_q, ref_layers = coherence_reference(model, LOSS, x, y, layer_of=layer_map(model))
    np.testing.assert_allclose(stats.m_coherence, ref_mc, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_sq_norms, ref_q, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_grad_sq_norm, ref_s, rtol=RTOL)
    assert set(stats.layers) == set(ref_layers)
    for name, ref in ref_layers.items():
        np.testing.assert_allclose(stats.layers[name].m_coherence, ref, rtol=RTOL, err_msg=name)
    return stats


# ------------------------------------------------------------------------- EinsumDense

EQUATIONS = [  # (equation, input shape without batch, output_shape, bias_axes)
    ("ab,bc->ac", (5,), 4, "c"),                    # a Dense
    ("abc,cd->abd", (6, 5), (6, 4), "d"),           # a Dense over a sequence: Gram or products
    ("abc,cd->abd", (2, 5), (2, 40), None),         # few positions, wide: the Gram form
    ("abc,cde->abde", (6, 5), (6, 2, 3), "de"),     # an attention projection (heads)
    ("abc,cde->abde", (6, 5), (6, 2, 3), "e"),      # bias broadcast over the heads
    ("abcd,cde->abe", (6, 2, 3), (6, 4), "e"),      # an attention output projection
    ("abc,cd->ad", (6, 5), 4, "d"),                 # an input axis summed away
    ("abc,bcd->ad", (6, 5), 4, None),               # positions contracted with the kernel
    ("...b,bc->...c", (3, 5), 4, "c"),              # an ellipsis
]


def _einsum_model(equation, in_shape, out_shape, bias_axes):
    keras.utils.set_random_seed(3)
    inp = keras.Input(in_shape)
    h = keras.layers.EinsumDense(equation, output_shape=out_shape, bias_axes=bias_axes,
                                 activation="tanh", bias_initializer="glorot_uniform", name="einsum")(inp)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h))


@pytest.mark.parametrize("equation, in_shape, out_shape, bias_axes", EQUATIONS)
def test_einsum_dense_rule_matches_brute_force(equation, in_shape, out_shape, bias_axes):
    model = _einsum_model(equation, in_shape, out_shape, bias_axes)
    assert isinstance(rule_for(model.get_layer("einsum"))[0], EinsumDenseRule)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9,) + in_shape).astype("float32")
    y = rng.integers(0, 3, 9)
    _check_against_reference(model, x, y, batch_size=5)


@pytest.mark.parametrize("equation, in_shape, out_shape, bias_axes", EQUATIONS)
def test_einsum_dense_per_example_grads_match_brute_force(equation, in_shape, out_shape, bias_axes):
    model = _einsum_model(equation, in_shape, out_shape, bias_axes)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6,) + in_shape).astype("float32")
    y = rng.integers(0, 3, 6)
    objective = lambda y_pred: tf.reduce_sum(engine.per_example_loss_fn(model)(y, y_pred))  # noqa: E731
    model.compile(loss=LOSS)
    result = engine.traced_backward(model, tf.constant(x), objective, "inference")
    got = engine.layer_per_example_grads(result, "einsum")
    ref = per_example_grads(model, LOSS, x, y)
    layer = model.get_layer("einsum")
    for v in layer.trainable_weights:
        index = next(i for i, w in enumerate(model.trainable_variables) if w is v)
        expected = np.stack([r[index] for r in ref])
        np.testing.assert_allclose(got[id(v)].numpy(), expected, rtol=1e-4, atol=1e-6, err_msg=v.name)


@pytest.mark.parametrize("equation, reason", [
    ("abc,cd->abcd", "exactly one"),   # a kernel axis in the input and the output
    ("bc,cd->bd", None),               # a plain product: supported
    ("abc,acd->abd", "first input axis"),  # the batch axis in the kernel
    ("abb,bc->ac", "repeats"),         # a diagonal
])
def test_einsum_layout_says_what_it_cannot_take(equation, reason):
    if reason is None:
        assert EinsumLayout.parse(equation).contracted == "c"
    else:
        with pytest.raises(Exception, match=reason):
            EinsumLayout.parse(equation)


def test_unsupported_einsum_takes_the_fallback_and_stays_exact():
    keras.utils.set_random_seed(4)
    inp = keras.Input((3, 4))
    h = keras.layers.EinsumDense("abc,cd->abcd", output_shape=(3, 4, 2), name="einsum")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h)))
    rule, reason = rule_for(model.get_layer("einsum"))
    assert rule is None and "exactly one" in reason
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3, 4)).astype("float32"), rng.integers(0, 3, 5)
    model.compile(loss=LOSS)
    with pytest.warns(UserWarning, match="fallback"):
        stats = gradient_stats(model, x, y, batch_size=5)
    ref_mc = coherence_reference(model, LOSS, x, y)[0]
    np.testing.assert_allclose(stats.m_coherence, ref_mc, rtol=RTOL)


# ------------------------------------------------------------------ MultiHeadAttention


def _transformer(use_bias=True, causal=False, dropout=0.0, output_shape=None):
    """Embedding (mask_zero) -> self-attention -> LayerNorm -> EinsumDense -> pooling."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(11, 8, mask_zero=True, name="embed")(inp)
    a = keras.layers.MultiHeadAttention(2, 3, value_dim=4, use_bias=use_bias, dropout=dropout,
                                        output_shape=output_shape, name="mha")(
        h, h, use_causal_mask=causal)
    if output_shape is None:
        h = keras.layers.LayerNormalization(name="norm")(h + a)
    else:  # [B, T, 2, 5] -> [B, T, 10]
        h = keras.layers.LayerNormalization(name="norm")(keras.layers.Reshape((7, 10))(a))
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 6), bias_axes="d",
                                 activation="relu", name="ffn")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h))


def _tokens(n=9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 11, size=(n, 7)).astype("int32")
    x[:, 5:] = np.where(rng.random((n, 2)) < 0.5, 0, x[:, 5:])  # padding: the mask matters
    return x, rng.integers(0, 3, n)


@pytest.mark.parametrize("use_bias, causal, dropout, output_shape", [
    (True, False, 0.0, None),
    (False, False, 0.0, None),
    (True, True, 0.0, None),
    (True, False, 0.5, None),     # dropout: off in inference mode
    (True, False, 0.0, (2, 5)),  # output projection to [T, 2, 5]
])
def test_self_attention_rule_matches_brute_force(use_bias, causal, dropout, output_shape):
    model = _transformer(use_bias, causal, dropout, output_shape)
    assert isinstance(rule_for(model.get_layer("mha"))[0], MultiHeadAttentionRule)
    x, y = _tokens()
    _check_against_reference(model, x, y, batch_size=5)


def test_cross_attention_with_an_explicit_mask_matches_brute_force():
    keras.utils.set_random_seed(6)
    q_in, v_in = keras.Input((4, 5)), keras.Input((6, 3))
    m_in = keras.Input((4, 6), dtype="bool")
    k_in = keras.Input((6, 2))
    a = keras.layers.MultiHeadAttention(3, 2, name="mha")(q_in, v_in, key=k_in, attention_mask=m_in)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(a))
    model = keras.Model([q_in, v_in, m_in, k_in], out)
    rng = np.random.default_rng(2)
    n = 8
    mask = rng.random((n, 4, 6)) < 0.7
    mask[:, :, 0] = True  # every query attends to something
    x = [rng.normal(size=(n, 4, 5)).astype("float32"), rng.normal(size=(n, 6, 3)).astype("float32"),
         mask, rng.normal(size=(n, 6, 2)).astype("float32")]
    y = rng.integers(0, 3, n)
    _check_against_reference(model, x, y, batch_size=4)


def test_attention_per_example_grads_match_brute_force():
    model = _transformer()
    x, y = _tokens(n=5, seed=3)
    model.compile(loss=LOSS)
    objective = lambda y_pred: tf.reduce_sum(engine.per_example_loss_fn(model)(y, y_pred))  # noqa: E731
    result = engine.traced_backward(model, tf.constant(x), objective, "inference")
    got = engine.layer_per_example_grads(result, "mha")
    ref = per_example_grads(model, LOSS, x, y)
    layer = model.get_layer("mha")
    assert len(got) == len(layer.trainable_weights) == 8
    for v in layer.trainable_weights:
        index = next(i for i, w in enumerate(model.trainable_variables) if w is v)
        expected = np.stack([r[index] for r in ref])
        np.testing.assert_allclose(got[id(v)].numpy(), expected, rtol=1e-4, atol=1e-6, err_msg=v.name)


def test_attention_returning_scores_keeps_both_outputs():
    keras.utils.set_random_seed(8)
    inp = keras.Input((5, 4))
    a, scores = keras.layers.MultiHeadAttention(2, 2, name="mha")(inp, inp, return_attention_scores=True)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(a), keras.layers.Flatten()(scores)])
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 5, 4)).astype("float32"), rng.integers(0, 3, 6)
    _check_against_reference(model, x, y, batch_size=6)
