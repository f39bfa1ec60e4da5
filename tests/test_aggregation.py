"""Aggregators and the aggregated train step against numpy brute force."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import keras_coherence as kc  # noqa: F401  (first: selects Keras 2)
from keras_coherence._keras import keras, tf
from keras_coherence.aggregation import Mean, MedianOfMeans, Winsorized, get, with_aggregator
from reference import per_example_grads


def np_winsorized_sum(g, c):
    """Sort each coordinate over examples, clip the c extremes on each side, sum."""
    s = np.sort(g, axis=0)
    lo, hi = s[c], s[len(g) - 1 - c]
    return np.clip(g, lo, hi).sum(0)


@st.composite
def _batch_and_c(draw):
    """A batch size m and a valid c (2c < m): every draw is a test, none is skipped."""
    c = draw(st.integers(0, 4))
    return draw(st.integers(2 * c + 1, 9)), c


@settings(max_examples=40, deadline=None)
@given(_batch_and_c(), st.integers(1, 6), st.booleans())
def test_winsorized_reduce_matches_sort_and_clip(m_c, n, ties):
    m, c = m_c
    rng = np.random.default_rng(m * 100 + c * 10 + n)
    g = rng.normal(size=(m, n, 2)).astype("float32")
    if ties:
        g = np.round(g)  # many exact ties
    out = Winsorized(c=c).reduce(tf.constant(g)).numpy()
    np.testing.assert_allclose(out, np_winsorized_sum(g.astype(np.float64), c), rtol=1e-5, atol=1e-5)


def test_winsorized_c0_is_sum_and_percentile_form():
    g = np.random.default_rng(0).normal(size=(11, 5)).astype("float32")
    np.testing.assert_allclose(Winsorized(c=0).reduce(tf.constant(g)), g.sum(0), rtol=1e-5)
    # nearest-rank percentiles of the ICLR 2020 code: c = round(p/100 * (m - 1))
    for p in (5, 10, 20, 30, 45):
        c = int(np.round(p / 100 * 10))
        np.testing.assert_allclose(Winsorized(percentile=p).reduce(tf.constant(g)),
                                   np_winsorized_sum(g.astype(np.float64), c), rtol=1e-5, atol=1e-6)
        lo, hi = np.percentile(g, [p, 100 - p], axis=0, method="nearest")
        np.testing.assert_allclose(Winsorized(percentile=p).reduce(tf.constant(g)),
                                   np.clip(g, lo, hi).sum(0), rtol=1e-5, atol=1e-6)


def test_winsorized_rejects_c_of_half_the_batch():
    with pytest.raises(ValueError, match="smaller c"):
        Winsorized(c=3).reduce(tf.zeros((6, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        Winsorized(c=-1)
    with pytest.raises(ValueError, match="exactly one"):
        Winsorized()


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 5])
def test_median_of_means_combine(groups):
    rng = np.random.default_rng(groups)
    means = [rng.normal(size=(3, 2)).astype("float32") for _ in range(groups)]
    out = MedianOfMeans(groups).combine([tf.constant(m) for m in means]).numpy()
    np.testing.assert_allclose(out, np.median(np.stack(means), axis=0), rtol=1e-6)


def test_get_parses_specs_and_rejects_bad_ones():
    assert get("winsorized:c=4").c == 4
    assert get("winsorized:percentile=2.5").percentile == 2.5
    assert get("m3").groups == 3 and get("m3:groups=5").groups == 5
    assert isinstance(get("mean"), Mean)
    assert get(get("wgd:c=1").spec()).c == 1
    for bad, match in (("median", "Unknown"), ("winsorized:c", "key=value"),
                       ("winsorized:c=x", "number"), ("m3:foo=1", "Bad arguments")):
        with pytest.raises(ValueError, match=match):
            get(bad)


class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight("w", shape=input_shape[-1:], initializer="random_normal")

    def call(self, x):
        return x * (1.0 + self.w)


def _model(seed, fallback=False):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3, activation="relu")(inp)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(6, activation="tanh")(h)
    if fallback:
        h = Scale()(h)
    out = keras.layers.Dense(3)(h)
    return keras.Model(inp, out)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.integers(0, 3, n)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _one_step(aggregator, n=10, fallback=False, sample_weight=None):
    """Weights before, per-example gradients (of w_i * loss_i), weights after one SGD step."""
    x, y = _data(n)
    base = _model(1, fallback)
    model = with_aggregator(base, aggregator)
    model.compile(keras.optimizers.SGD(0.5), LOSS)
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    grads = per_example_grads(model, LOSS, x, y, sample_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, sample_weight=sample_weight, batch_size=n, epochs=1, shuffle=False, verbose=0)
    after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    return before, grads, after


@pytest.mark.parametrize("c", [0, 1, 3])
def test_winsorized_step_matches_numpy(c):
    n = 10
    w = np.random.default_rng(5).uniform(0.5, 1.5, n).astype("float32")
    before, grads, after = _one_step(f"winsorized:c={c}", n, fallback=True, sample_weight=w)
    for i, (b, a) in enumerate(zip(before, after)):
        g = np.stack([gs[i] for gs in grads]) / n  # per-example gradients of the mean loss
        np.testing.assert_allclose(a, b - 0.5 * np_winsorized_sum(g, c), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("groups, n", [(3, 12), (3, 10), (4, 10), (2, 7)])
def test_median_of_means_step_matches_numpy(groups, n):
    before, grads, after = _one_step(f"m3:groups={groups}", n)
    parts = np.array_split(np.arange(n), groups)
    for i, (b, a) in enumerate(zip(before, after)):
        g = np.stack([gs[i] for gs in grads])
        means = np.stack([g[idx].mean(0) for idx in parts])
        np.testing.assert_allclose(a, b - 0.5 * np.median(means, axis=0), rtol=1e-4, atol=1e-6)


def test_mean_aggregator_equals_plain_keras_with_batchnorm_and_regularizer():
    x, y = _data(24)

    def build():
        keras.utils.set_random_seed(2)
        inp = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(3, 3, kernel_regularizer=keras.regularizers.l2(0.01))(inp)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Flatten()(h)
        return keras.Model(inp, keras.layers.Dense(3)(h))

    plain, agg_model = build(), with_aggregator(build(), "winsorized:c=0", report_coherence=True)
    for m in (plain, agg_model):
        m.compile(keras.optimizers.SGD(0.1), LOSS, metrics=["accuracy"])
    h1 = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    h2 = agg_model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                       validation_data=(x, y))
    for a, b in zip(plain.get_weights(), agg_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5)
    assert "val_accuracy" in h2.history and "m_coherence" in h2.history


def test_winsorized_rejects_large_c_at_fit_time():
    model = with_aggregator(_model(0), "winsorized:c=4")
    model.compile("sgd", LOSS)
    x, y = _data(8)
    with pytest.raises(Exception, match="smaller c"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_aggregated_model_save_and_load(tmp_path):
    model = with_aggregator(_model(3), "m3:groups=3")
    model.compile("sgd", LOSS)
    x, y = _data(12)
    model.fit(x, y, batch_size=12, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.aggregator.groups == 3
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.parametrize("module", ["keras_coherence.aggregation.aggregators",
                                    "keras_coherence.aggregation.train_step", "keras_coherence.optimizers"])
def test_docstring_examples_print_what_they_claim(module):
    import doctest
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
