"""ScaleMonitor (keras_coherence.quantization.monitor) against hand-computed values and
the quantizers' own TF math.

The analytic test sets the kernels and exponents by hand, so the exponents, clip
fractions and MSQEs below are worked out on paper (the comments show the arithmetic).
"""
import csv
import doctest
import math

import numpy as np
import pytest
from test_quantizers import QDense  # a Dense whose kernel goes through a PO2 quantizer layer

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras, tf
from keras_coherence.quantization import LearnedPo2, MSQEPo2, MSQEPo2Baseline, ScaleMonitor, quantize_model
from keras_coherence.quantization import _po2
from keras_coherence.quantization import monitor as q_monitor
from keras_coherence.quantization import qat as q_qat

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Kernel of layer "a" (4 inputs, 2 output channels, 4-bit MSQEPo2 per channel, qp = 7).
A_KERNEL = np.array([[0.5, 2.0], [-0.25, -1.0], [0.125, 0.5], [0.875, 3.3]], np.float32)
# Kernel of layer "b" (2 inputs, 3 outputs, 3-bit LearnedPo2 per tensor, qp = 3).
B_KERNEL = np.array([[0.3, -0.1, 0.9], [0.05, -0.6, 0.2]], np.float32)


def _hand_model():
    model = keras.Sequential([
        keras.Input((4,)),
        QDense(2, kernel_quantizer=MSQEPo2(bits=4, per_channel=True, outlier_mask=False), name="a"),
        QDense(3, kernel_quantizer=LearnedPo2(bits=3, rounding="ceil"), name="b"),
        QDense(1, kernel_quantizer=MSQEPo2Baseline(bits=4), name="c"),
    ])
    model.get_layer("a").kernel.assign(A_KERNEL)
    model.get_layer("b").kernel.assign(B_KERNEL)
    model.get_layer("c").kernel.assign(np.array([[0.25], [0.5], [-0.75]], np.float32))
    return model


def _rows(monitor, step=None):
    return {r["layer"]: r for r in monitor.history if step is None or r["step"] == step}


def test_exponent_clip_fraction_and_msqe_by_hand():
    model = _hand_model()
    x = np.ones((2, 4), np.float32)
    model(x, training=True)  # every quantizer runs once in training: exponents searched and stored
    monitor = ScaleMonitor()
    monitor.set_model(model)
    assert [t.name for t in monitor.quantizers()] == ["a", "b", "c"]

    # a: column 0 = 2**-3 * [4, -2, 1, 7] exactly -> e = -3, no error. Column 1:
    # e = -1 (LS scale 33.6 / 70 = 0.48 -> 2**-1); 3.3 / 0.5 = 6.6 -> 7 -> error 0.2**2.
    # c (QKeras auto_po2): start po2(0.75 / 7) = 2**-3; [0.25, 0.5, -0.75] = 2**-3 * [2, 4, -6],
    # so the least-squares refits stay at -3 with no error.
    totals = monitor.record()
    rows = _rows(monitor)
    a, c = rows["a"], rows["c"]
    assert (a["exponent_min"], a["exponent_max"], a["exponent"], a["channels"]) == (-3, -1, -2.0, 2)
    assert a["clip_fraction"] == 0.0 and a["flips"] == 0
    assert a["msqe"] == pytest.approx(0.04 / 8, rel=1e-6)
    assert a["wmsqe"] == pytest.approx(0.04 / 8, rel=1e-6)  # m2 starts as ones: same as msqe
    assert (c["exponent"], c["channels"], c["msqe"], c["clip_fraction"]) == (-3.0, 1, 0.0, 0.0)
    assert math.isnan(c["wmsqe"]) and math.isnan(rows["b"]["wmsqe"])  # no second moments there
    # b: std of its 6 weights = sqrt(1.21875 / 6) = 0.4507; e = ceil(log2(3 * 0.4507 / 3)) = ceil(-1.15)
    assert rows["b"]["exponent"] == -1.0
    assert totals["scale_flips"] == 0 and totals["step"] == 0

    # Now set the state by hand and freeze: a -> exponents [-4, -1], b -> log2-scale -2.3.
    qa = model.get_layer("a").kernel_quantizer
    qb = model.get_layer("b").kernel_quantizer
    qb.log2_scale.assign([[-2.3]])
    model(x, training=True)  # b: e_int = ceil(-2.3) = -2
    qa.state["exponent"].assign([[-4.0, -1.0]])
    qa.state["m2"].assign(np.array([[4.0, 1.0], [1.0, 1.0], [1.0, 1.0], [9.0, 16.0]], np.float32))
    qa.freeze()
    totals = monitor.record()
    a, b = monitor.history[-3], monitor.history[-2]
    assert (a["layer"], b["layer"]) == ("a", "b")
    # a, column 0 / 2**-4 = [8, -4, 2, 14]: 8 and 14 clip to 7 -> errors 1/16 and 7/16.
    assert (a["exponent"], a["exponent_min"], a["exponent_max"]) == (-2.5, -4, -1)
    assert (a["flips"], a["flip_rate"]) == (1, 0.5)
    assert a["clip_fraction"] == 2 / 8
    err0 = (1 / 16) ** 2 + (7 / 16) ** 2
    assert a["msqe"] == pytest.approx((err0 + 0.04) / 8, rel=1e-6)
    # weights sqrt(m2): 2 on the 0.5 (error 1/16), 3 on the 0.875, 4 on the 3.3 (error 0.2)
    wsum = 2 + 1 + 1 + 1 + 1 + 1 + 3 + 4
    assert a["wmsqe"] == pytest.approx((2 * (1 / 16) ** 2 + 3 * (7 / 16) ** 2 + 4 * 0.04) / wsum, rel=1e-6)
    # b, s = 1/4: x / s = [1.2, -0.4, 3.6, 0.2, -2.4, 0.8] -> [1, 0, 4->3, 0, -2, 1];
    # errors 0.05, 0.1, 0.15, 0.05, 0.1, 0.05 (squared: 0.05 in all).
    assert (b["exponent"], b["channels"], b["bits"], b["quantizer"]) == (-2.0, 1, 3, "LearnedPo2")
    assert b["clip_fraction"] == pytest.approx(1 / 6)
    assert b["msqe"] == pytest.approx(0.05 / 6, rel=1e-5)
    assert (b["flips"], b["flip_rate"]) == (1, 1.0)  # -1 -> -2
    # totals over the 8 + 6 + 3 weights and 2 + 1 + 1 exponents; wmsqe from layer a only
    assert totals["scale_flips"] == 2
    assert totals["scale_flip_rate"] == 2 / 4
    assert totals["clip_fraction"] == pytest.approx(3 / 17)
    assert totals["msqe"] == pytest.approx((err0 + 0.04 + 0.05) / 17, rel=1e-5)
    assert totals["wmsqe"] == pytest.approx(a["wmsqe"])


class _AssignExponents(keras.callbacks.Callback):
    """Before the monitor (earlier in the list) sees step k, sets layer a's exponents."""

    def __init__(self, layer, plan):
        super().__init__()
        self.layer, self.plan, self.step, self.batch_logs = layer, plan, 0, []

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step in self.plan:
            self.layer.kernel_quantizer.state["exponent"].assign([self.plan[self.step]])


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(logs.get("scale_flips"))


@pytest.mark.parametrize("every, batch_flips, epoch_flips", [
    (1, [0, 2, 1, 0], [2, 0]),
    (2, [None, 2, None, 1], [2, 1]),  # records compare with records: step 3's flip-back is 1 flip vs step 2
])
def test_flips_counted_between_records_through_fit(every, batch_flips, epoch_flips):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), QDense(4, kernel_quantizer=MSQEPo2(bits=4, per_channel=True),
                                                        name="a")])
    layer = model.get_layer("a")
    layer.kernel_quantizer.freeze(layer.kernel)  # fixed exponents unless assigned
    e0 = layer.kernel_quantizer.state["exponent"].numpy()[0].copy()
    changed = e0 + np.array([1.0, 0.0, -1.0, 0.0])
    back = e0 + np.array([0.0, 0.0, -1.0, 0.0])
    assign = _AssignExponents(layer, {2: changed, 3: back})
    monitor, batch_logs = ScaleMonitor(every_n_steps=every), _BatchLogs()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    history = model.fit(x, x[:, :1] @ np.ones((1, 4), np.float32), batch_size=4, epochs=2, shuffle=False,
                        verbose=0, callbacks=[assign, monitor, batch_logs])
    assert batch_logs.seen == batch_flips
    assert history.history["scale_flips"] == epoch_flips
    assert [r["step"] for r in monitor.history] == list(range(every, 5, every))
    assert [r["flip_rate"] for r in monitor.history] == [f / 4 for f in batch_flips if f is not None]
    np.testing.assert_array_equal(monitor.history[-1]["exponent_min"], back.min())
    assert monitor.history[-1]["epoch"] == 2.0


def _tiny_qat(method):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return quantize_model(keras.Model(inp, keras.layers.Dense(3, name="dense")(x)), bits=4, method=method)


def test_qat_model_through_fit_matches_the_quantizers_tf_math(tmp_path):
    model = _tiny_qat("msqe")
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = ScaleMonitor()
    csv_log = str(tmp_path / "fit.csv")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 16)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                        callbacks=[monitor, keras.callbacks.CSVLogger(csv_log)])
    assert [(r["step"], r["layer"], r["channels"]) for r in monitor.history] == [
        (1, "conv", 4), (1, "dense", 1), (2, "conv", 4), (2, "dense", 1)]
    last = _rows(monitor, step=2)
    clipped = count = 0
    sq = 0.0
    for k in q_qat.quantized_kernels(model):
        row, q = last[k.name], k.quantizer.quantizer
        e = k.state["exponent"]
        view = k.view()  # the BN-folded kernel for conv
        ref_e = q.exponent(k.state).numpy()
        assert (row["exponent_min"], row["exponent_max"]) == (ref_e.min(), ref_e.max())
        assert row["exponent"] == pytest.approx(ref_e.mean())
        inside = _po2.inside_mask(view, e, q.qp).numpy()
        err2 = tf.math.squared_difference(view, _po2.fake_quantize(view, e, q.qp)).numpy()
        assert row["clip_fraction"] == pytest.approx(1.0 - inside.mean())
        assert row["msqe"] == pytest.approx(err2.mean(), rel=1e-5, abs=1e-12)
        g = np.sqrt(k.state["m2"].numpy())
        assert row["wmsqe"] == pytest.approx((g * err2).sum() / g.sum(), rel=1e-5, abs=1e-12)
        clipped, count, sq = clipped + (1.0 - inside).sum(), count + inside.size, sq + err2.sum()
    for key in ("scale_flips", "scale_flip_rate", "clip_fraction", "msqe", "wmsqe"):
        assert history.history[key] == [pytest.approx(monitor.totals[-1][key])]
    assert monitor.totals[-1]["clip_fraction"] == pytest.approx(clipped / count)
    assert monitor.totals[-1]["msqe"] == pytest.approx(sq / count, rel=1e-5)
    with open(csv_log, newline="") as f:
        logged = list(csv.DictReader(f))
    assert float(logged[0]["msqe"]) == pytest.approx(monitor.totals[-1]["msqe"], rel=1e-6)

    # to_csv reads back exactly; plot writes a PNG
    path = monitor.to_csv(str(tmp_path / "scales.csv"))
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(q_monitor.COLUMNS) and len(back) == 4
    for row, read in zip(monitor.history, back):
        assert read["layer"] == row["layer"] and float(read["msqe"]) == row["msqe"]
    png = monitor.plot(str(tmp_path / "plots" / "scales.png"))
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    from matplotlib.image import imread

    image = imread(png)
    assert image.shape[0] > 100 and float(image.std()) > 0


def test_baseline_qat_has_no_weighted_msqe():
    model = _tiny_qat("msqe_baseline")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    monitor = ScaleMonitor()
    history = model.fit(np.ones((4, 8, 8, 1), np.float32), np.zeros((4, 3), np.float32), verbose=0,
                        callbacks=[monitor])
    assert "wmsqe" not in history.history and "wmsqe" not in monitor.totals[-1]
    assert all(math.isnan(r["wmsqe"]) for r in monitor.history)
    assert [r["quantizer"] for r in monitor.history] == ["MSQEPo2Baseline"] * 2


def test_activation_quantizer_layer_has_exponents_only():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"), MSQEPo2(bits=4, name="act")])
    model(np.ones((2, 4), np.float32), training=True)
    monitor = ScaleMonitor()
    monitor.set_model(model)
    totals = monitor.record()
    (row,) = monitor.history
    assert row["layer"] == "act" and row["channels"] == 1 and math.isfinite(row["exponent"])
    assert math.isnan(row["msqe"]) and math.isnan(row["clip_fraction"])
    assert math.isnan(totals["msqe"]) and "wmsqe" not in totals


def test_nested_models_and_duplicate_names():
    def inner(name):
        return keras.Sequential([keras.Input((3,)), QDense(3, kernel_quantizer=MSQEPo2(bits=4), name="a")], name=name)

    model = keras.Sequential([keras.Input((3,)), inner("m1"), inner("m2")])
    model(np.ones((2, 3), np.float32), training=True)
    monitor = ScaleMonitor()
    monitor.set_model(model)
    assert [t.name for t in monitor.quantizers()] == ["a#0", "a#1"]
    monitor.record()
    model.layers[0].get_layer("a").kernel_quantizer.state["exponent"].assign([[5.0]])
    monitor.record()
    assert [(r["layer"], r["flips"]) for r in monitor.history] == [("a#0", 0), ("a#1", 0), ("a#0", 1), ("a#1", 0)]


def test_errors():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no PO2 weight quantizer.*quantize_model"):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0, callbacks=[ScaleMonitor()])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            ScaleMonitor(every_n_steps=bad)
    with pytest.raises(ValueError, match="no model"):
        ScaleMonitor().record()
    with pytest.raises(ValueError, match="nothing to plot|no ScaleMonitor records"):
        ScaleMonitor().plot("unused.png")


def test_docstring_example():
    result = doctest.testmod(q_monitor, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
