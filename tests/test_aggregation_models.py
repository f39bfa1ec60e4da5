"""The aggregated train step on real layer kinds against a brute-force reference.

The reference never touches the library's per-example machinery: one example at a
time through ``tf.GradientTape``, then numpy (sort + clip for Winsorized, group means
and their median for M3), then the SGD update (and the kernel constraint) by hand.
"""
import numpy as np
import pytest

import keras_coherence as kc  # noqa: F401  (first: it selects Keras 2 (tf_keras) for larq)
import larq as lq  # noqa: E402  (a required dependency)
from keras_coherence._keras import keras, tf
from keras_coherence.aggregation import with_aggregator

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LR = 0.1


def _embedding_conv1d(rng):
    """Embedding -> Conv1D -> LayerNormalization -> Dense on [B, T, C] -> Dense."""
    inp = keras.Input((7,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(12, 4, name="embed")(inp)
    h = keras.layers.Conv1D(3, 3, activation="tanh", name="conv1d")(h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Dense(3, activation="tanh", name="dense_3d")(h)  # Dense on [B, T, C]
    h = keras.layers.Flatten(name="flat")(h)
    out = keras.layers.Dense(3, name="logits")(h)
    return keras.Model(inp, out, name="embed_conv1d"), rng.integers(0, 12, size=(128, 7)).astype("int32")


def _larq(rng):
    """larq QuantConv2D and QuantDense (straight-through sign estimators, weight_clip)."""
    inp = keras.Input((5, 5, 1), name="image")
    h = lq.layers.QuantConv2D(2, 3, kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                              name="qconv")(inp)
    h = keras.layers.Flatten(name="flat")(h)
    h = lq.layers.QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                             kernel_constraint="weight_clip", name="qdense")(h)
    out = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(inp, out, name="larq_net")
    for v in model.trainable_variables:  # latent weights on both sides of the STE clip
        if len(v.shape) > 1:
            v.assign(rng.normal(scale=1.2, size=v.shape).astype("float32"))
    return model, rng.normal(size=(128, 5, 5, 1)).astype("float32")


def _attention(rng):
    """Embedding (mask_zero) -> MultiHeadAttention -> LayerNormalization -> EinsumDense ->
    pooling -> Dense: the attention and EinsumDense rules' per-example gradients."""
    inp = keras.Input((6,), dtype="int32", name="tokens")
    # embeddings of unit scale: attention scores that vary, so every projection learns
    h = keras.layers.Embedding(12, 4, mask_zero=True, embeddings_initializer="random_normal",
                               name="embed")(inp)
    h = keras.layers.Lambda(lambda t: 20.0 * t, name="scale")(h)
    a = keras.layers.MultiHeadAttention(2, 2, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="norm")(h + a)
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 5), bias_axes="d",
                                 activation="tanh", name="ffn")(h)
    out = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling1D(name="pool")(h))
    tokens = rng.integers(0, 12, size=(128, 6)).astype("int32")
    tokens[:, 0] = np.maximum(tokens[:, 0], 1)  # no example is all padding
    return keras.Model(inp, out, name="attention"), tokens


BUILDERS = {"embed_conv1d": _embedding_conv1d, "larq": _larq, "attention": _attention}


def _setup(kind, n):
    """A fresh model (same weights for the same kind), ``n`` inputs and labels."""
    rng = np.random.default_rng(7)
    keras.utils.set_random_seed(7)
    model, x = BUILDERS[kind](rng)
    y = rng.integers(0, 3, 128)
    return model, x[:n], y[:n]


def _per_example_grads(model, x, y):
    """``[B, ...]`` per variable: the gradient of each example's own loss, one at a time."""
    variables = model.trainable_variables

    @tf.function
    def one(xi, yi):
        with tf.GradientTape() as tape:
            loss = LOSS(yi, model(xi, training=True))
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]

    grads = [one(x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
    return [np.stack([g[j].numpy().astype(np.float64) for g in grads]) for j in range(len(variables))]


def _winsorized_sum(g, c):
    s = np.sort(g, axis=0)
    return np.clip(g, s[c], s[len(g) - 1 - c]).sum(0)


def _direction(g, spec):
    """The reference update direction from per-example gradients ``g`` (``[B, ...]``)."""
    name, _, arg = spec.partition(":")
    value = int(arg.partition("=")[2])
    if name == "winsorized":
        return _winsorized_sum(g / len(g), value)  # per-example gradients of the mean loss
    means = np.stack([g[idx].mean(0) for idx in np.array_split(np.arange(len(g)), value)])
    return np.median(means, axis=0)


def _constrained(variable, value):
    return np.clip(value, -1.0, 1.0) if variable.constraint is not None else value  # weight_clip


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("n, spec, how", [
    (100, "winsorized:c=3", "fit"),           # static batch of 100: selection network
    (128, "winsorized:c=9", "train_on_batch"),  # c + 1 > 8: top_k
    (100, "m3:groups=3", "train_on_batch"),    # groups of 34, 33, 33
    (128, "m3:groups=4", "fit"),
])
def test_aggregated_step_matches_one_example_at_a_time(kind, n, spec, how):
    base, x, y = _setup(kind, n)
    variables = base.trainable_variables
    before = [v.numpy().astype(np.float64) for v in variables]
    grads = _per_example_grads(base, x, y)
    model = with_aggregator(base, spec)
    model.compile(keras.optimizers.SGD(LR), LOSS)
    if how == "fit":
        model.fit(x, y, batch_size=n, epochs=1, shuffle=False, verbose=0)
    else:
        model.train_on_batch(x, y)
    for v, b, g in zip(variables, before, grads):
        expected = _constrained(v, b - LR * _direction(g, spec))
        scale = np.abs(b).max() + 1e-3
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-4, atol=2e-5 * scale, err_msg=v.name)
        # the step moved every variable (no silent no-op); attention's key bias has a zero
        # gradient (the softmax ignores a shift shared by a query's scores)
        if v.constraint is None and np.abs(g).max() > 1e-6:
            assert np.abs(v.numpy() - b).max() > 1e-6, v.name
