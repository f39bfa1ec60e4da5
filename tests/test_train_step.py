"""CoherenceModel: trains exactly like Keras and reports the batch's m-coherence."""
import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence._keras import keras
from keras_coherence.coherence import CoherenceModel, with_coherence
from reference import coherence_reference


def _model(seed, bn=False, reg=False, activity=False):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu",
                           kernel_regularizer=keras.regularizers.l2(0.01) if reg else None,
                           activity_regularizer=keras.regularizers.l2(0.05) if activity else None)(inp)
    if bn:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dense(5, activation="tanh")(h)
    out = keras.layers.Dense(3)(h)
    return keras.Model(inp, out)


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def test_logged_m_coherence_is_the_batch_value_before_the_step():
    x, y = _data()
    model = with_coherence(_model(0))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.1), loss)
    ref_mc, *_ = coherence_reference(model, loss, x, y)
    hist = model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(hist.history["m_coherence"][0], ref_mc, rtol=1e-4)
    np.testing.assert_allclose(hist.history["alpha"][0], ref_mc / 24, rtol=1e-4)


@pytest.mark.parametrize("bn, reg, weights, activity", [(False, False, False, False), (True, True, True, False),
                                                        (False, True, False, True)])
def test_update_equals_plain_keras_step(bn, reg, weights, activity):
    x, y = _data(32)
    sw = np.random.default_rng(1).uniform(0.2, 2.0, 32).astype("float32") if weights else None
    plain = _model(3, bn, reg, activity)
    coh = with_coherence(_model(3, bn, reg, activity), per_layer=True)
    for m in (plain, coh):
        m.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    h1 = plain.fit(x, y, sample_weight=sw, batch_size=8, epochs=2, shuffle=False, verbose=0)
    h2 = coh.fit(x, y, sample_weight=sw, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), coh.get_weights()):  # includes BN moving statistics
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5)
    assert any(k.startswith("m_coherence/") for k in h2.history)


def test_save_and_load_roundtrip(tmp_path):
    x, y = _data()
    model = with_coherence(_model(5), per_layer=True)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, CoherenceModel) and loaded.coherence_per_layer
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    h = loaded.fit(x, y, epochs=1, verbose=0)  # optimizer state restored, training resumes
    assert "m_coherence" in h.history


def test_subclassed_model_is_refused_with_advice():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="CoherenceMonitor"):
        with_coherence(Net())


def test_monitor_logs_to_history_csv_and_tensorboard(tmp_path):
    x, y = _data(40)
    model = _model(7)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.1), loss)
    monitor = kc.callbacks.CoherenceMonitor(x[:16], y[:16], every_n_steps=2,
                                            csv_path=str(tmp_path / "c.csv"),
                                            log_dir=str(tmp_path / "tb"))
    ref_mc, *_ = coherence_reference(model, loss, x[:16], y[:16])
    hist = model.fit(x, y, batch_size=10, epochs=2, callbacks=[monitor], verbose=0)
    np.testing.assert_allclose(monitor.history[0]["m_coherence"], ref_mc, rtol=1e-4)
    # 2 epochs of 4 steps; every 2 steps, plus the final step (8 is a multiple anyway)
    assert [r["step"] for r in monitor.history] == [0, 2, 4, 6, 8]
    assert [r["epoch"] for r in monitor.history] == [0, 0.5, 1.0, 1.5, 2.0]
    assert hist.history["m_coherence"][-1] == monitor.history[-1]["m_coherence"]
    rows = (tmp_path / "c.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(monitor.history) and rows[0].startswith("step,epoch,m,m_coherence")
    assert list((tmp_path / "tb").iterdir())
    # the final measurement is the probe's coherence at the trained weights
    ref_end, *_ = coherence_reference(model, loss, x[:16], y[:16])
    np.testing.assert_allclose(monitor.history[-1]["m_coherence"], ref_end, rtol=1e-4)


def test_monitor_always_measures_the_final_step():
    x, y = _data(30)
    model = _model(8)
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = kc.callbacks.CoherenceMonitor(x[:8], y[:8], every_n_steps=2)
    model.fit(x, y, batch_size=10, epochs=1, callbacks=[monitor], verbose=0)  # 3 steps
    assert [r["step"] for r in monitor.history] == [0, 2, 3]


def test_mean_aggregator_update_equals_plain_keras_with_every_kind_of_regularizer():
    """The aggregated step with the mean is plain SGD: the data gradient (an activity
    regularizer's term included, through the layer outputs) plus the weight regularizers'
    gradient, each counted once."""
    x, y = _data(32)
    plain = _model(4, reg=True, activity=True)
    agg = kc.aggregation.with_aggregator(_model(4, reg=True, activity=True), "mean")
    for m in (plain, agg):
        m.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    agg.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), agg.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
