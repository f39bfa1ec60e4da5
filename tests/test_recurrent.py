"""Recurrent layers through the generic fallback: exact per-example gradients.

``tf.vectorized_map`` cannot vectorize the while-loop gradient of LSTM/GRU, so the
fallback runs their per-example VJPs one example after another. References: one
example at a time with ``tape.gradient`` (tests/reference.py) and numpy.
"""
import warnings

import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence._keras import keras, tf
from keras_coherence.aggregation import with_aggregator
from keras_coherence.coherence import gradient_stats
from reference import coherence_reference, layer_map, per_example_grads

RTOL = 1e-4


class ScanCell(keras.layers.Layer):
    """A hand-written recurrence with ``tf.scan`` (no Keras RNN base class)."""

    def build(self, input_shape):
        self.w = self.add_weight("w", shape=(input_shape[-1], 3), initializer="glorot_uniform")
        self.u = self.add_weight("u", shape=(3, 3), initializer="orthogonal")

    def call(self, x):
        steps = tf.transpose(x, [1, 0, 2])  # [T, B, C]
        init = tf.zeros([tf.shape(x)[0], 3])
        states = tf.scan(lambda h, xt: tf.tanh(xt @ self.w + h @ self.u), steps, initializer=init)
        return states[-1]


def _recurrent(kind):
    if kind == "lstm":
        return keras.layers.LSTM(4, name="rnn")
    if kind == "gru":
        return keras.layers.GRU(4, name="rnn")
    if kind == "bidirectional_lstm":
        return keras.layers.Bidirectional(keras.layers.LSTM(3), name="rnn")
    if kind == "simple_rnn":
        return keras.layers.SimpleRNN(4, name="rnn")
    if kind == "lstm_sequences":
        return keras.Sequential([keras.layers.LSTM(3, return_sequences=True),
                                 keras.layers.GlobalAveragePooling1D()], name="rnn")
    return ScanCell(name="rnn")


def _model(kind):
    keras.utils.set_random_seed(7)
    inp = keras.Input((5, 3))
    h = _recurrent(kind)(inp)
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


KINDS = ["lstm", "gru", "bidirectional_lstm", "simple_rnn", "lstm_sequences", "scan_cell"]


def _data(n=7):
    rng = np.random.default_rng(11)
    return rng.normal(size=(n, 5, 3)).astype("float32"), rng.integers(0, 2, n)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_stats_of_recurrent_layers_match_brute_force(kind):
    x, y = _data()
    model = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one-time fallback warning
        stats = gradient_stats(model, x, y, batch_size=4)
    ref_mc, ref_s, ref_q, ref_layers = coherence_reference(model, model.loss, x, y, layer_of=layer_map(model))
    np.testing.assert_allclose(stats.m_coherence, ref_mc, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_sq_norms, ref_q, rtol=RTOL)
    # the Sequential wrapper's variables belong to its inner layers in the reference map
    outer = {name.split("/")[0] for name in ref_layers}
    assert {name.split("/")[0] for name in stats.layers} == outer


def test_with_coherence_metric_of_an_lstm_matches_brute_force():
    x, y = _data(6)
    model = _model("lstm")
    ref_mc = coherence_reference(model, model.loss, x, y)[0]
    cmodel = kc.coherence.with_coherence(model)
    cmodel.compile(keras.optimizers.SGD(0.0), model.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        logs = cmodel.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["m_coherence"], ref_mc, rtol=RTOL)


@pytest.mark.parametrize("kind", ["gru", "bidirectional_lstm"])
def test_winsorized_step_through_a_recurrent_layer_matches_brute_force(kind):
    x, y = _data(8)
    model = _model(kind)
    loss = model.loss
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    grads = per_example_grads(model, loss, x, y)
    lr, c = 0.3, 1
    expected = []
    for k, w in enumerate(before):
        g = np.stack([gs[k] for gs in grads])
        s = np.sort(g, axis=0)
        expected.append(w - lr * np.clip(g, s[c], s[len(g) - 1 - c]).mean(0))
    wmodel = with_aggregator(model, f"winsorized:c={c}")
    wmodel.compile(keras.optimizers.SGD(lr), loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wmodel.train_on_batch(x, y)
    for v, want in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-4, atol=1e-6, err_msg=v.name)


def test_fallback_goes_sequential_when_vectorization_fails(monkeypatch):
    """Any layer whose pfor conversion raises still gets exact per-example gradients."""
    def failing_vectorized_map(*args, **kwargs):
        raise TypeError("pfor cannot convert this op")

    monkeypatch.setattr(tf, "vectorized_map", failing_vectorized_map)
    x, y = _data()
    model = _model("scan_cell")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stats = gradient_stats(model, x, y, batch_size=4)
    ref_mc, _, ref_q, ref_layers = coherence_reference(model, model.loss, x, y, layer_of=layer_map(model))
    np.testing.assert_allclose(stats.m_coherence, ref_mc, rtol=RTOL)
    np.testing.assert_allclose(stats.layers["rnn"].m_coherence, ref_layers["rnn"], rtol=RTOL)
