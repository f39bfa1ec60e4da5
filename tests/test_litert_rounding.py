"""litert_rounding: the Keras QAT model's inference rounding as LiteRT does.

References: LiteRT itself (the exported model's outputs), and TFLite's
QuantizeMultiplier / MultiplyByQuantizedMultiplier written out by hand for a few
multipliers (integer arithmetic checked digit by digit)."""
import numpy as np
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras, tf
from keras_coherence.quantization import quantize_model
from keras_coherence.quantization.export import run_tflite, tflite_output_step, to_tflite
from keras_coherence.quantization.litert import _requantize_tf, litert_rounding, quantize_multiplier, requantize


def test_quantize_multiplier_by_hand():
    # 0.25108808 = 0.50217616 * 2**-1 -> q31 = round(0.50217616 * 2**31)
    q31, shift = quantize_multiplier(np.array([0.25108808, 0.5, 1.5, 0.0625]))
    assert list(shift) == [-1, 0, 1, -3]
    assert q31[0] == round(0.50217616 * 2 ** 31)
    assert list(q31[1:]) == [2 ** 30, 3 * 2 ** 29, 2 ** 30]


# m = q31 / 2**31 * 2**shift; v = (acc * q31 + nudge) / 2**31 truncated, nudge = 2**30
# (1 - 2**30 below zero); then v >> -shift, plus 1 if the remainder exceeds half (for
# v < 0: half or more).
@pytest.mark.parametrize("acc, m, expected", [
    (5, 0.5, 3),     # q31 = 2**30, shift 0: (5 * 2**30 + 2**30) / 2**31 = 3
    (-5, 0.5, -2),   # (-5 * 2**30 + 1 - 2**30) / 2**31 = -2.99.. -> -2 (ties go up)
    (7, 0.25, 2),    # shift -1: v = 4, 4 >> 1 = 2, remainder 0
    (5, 0.25, 2),    # v = 3, 3 >> 1 = 1, remainder 1 > 0 -> 2 (single rounding: 1.25 -> 1)
    (-7, 0.25, -2),  # v = (-7 * 2**30 + 1 - 2**30) / 2**31 -> -3; -3 >> 1 = -2, remainder 1, threshold 1 -> -2
])
def test_requantize_by_hand(acc, m, expected):
    assert int(requantize(np.array([acc]), np.array([m]))[0]) == expected


def test_double_rounding_differs_from_single_rounding_just_above_a_power_of_two():
    m = np.array([0.2511])
    acc = np.arange(-400, 400)
    single = np.floor(acc * m[0] + 0.5)
    double = requantize(acc, m)
    assert np.all(np.abs(double - single) <= 1)
    assert np.any(double != single)  # the effect the module exists for


def test_tf_and_numpy_requantize_agree():
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.uniform(1e-4, 3.0, 30), [0.5, 0.25, 1.0, 2.0 ** -7]])
    acc = rng.integers(-(2 ** 20), 2 ** 20, size=(64, m.size))
    got = _requantize_tf(tf.constant(acc, tf.int64), tf.constant(m, tf.float64)).numpy()
    np.testing.assert_array_equal(got, requantize(acc, m))


def _relu6_net():
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(6.0, name="relu1")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(6.0, name="relu2")(x)
    x = keras.layers.Conv2D(8, 1, use_bias=False, name="pw")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    x = keras.layers.ReLU(6.0, name="relu3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(5, name="dense")(x))


def test_emulated_keras_matches_litert():
    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(4)
    x = rng.random((64, 12, 12, 3), dtype=np.float32)
    model = quantize_model(_relu6_net(), bits=4, method="msqe_baseline", calibration_data=x)
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(64, 5)).astype(np.float32), batch_size=16, verbose=0)
    tflite_model = to_tflite(model)
    lite = run_tflite(tflite_model, x)
    step = tflite_output_step(tflite_model)
    plain = model.predict(x, verbose=0)
    with litert_rounding(model) as report:
        emulated = model.predict(x, verbose=0)
    assert report["patched"] == ["conv", "dw", "pw", "dense"] and not report["skipped"]
    # Restored afterwards: the plain fake-quant output again.
    np.testing.assert_array_equal(model.predict(x, verbose=0), plain)
    plain_steps = np.abs(plain - lite) / step
    emulated_steps = np.abs(emulated - lite) / step
    # Measured: plain 78% of logits equal LiteRT's, emulated 91% (the rest: the MEAN op of
    # the pooling, which keeps its own rounding), every logit within one step.
    assert emulated_steps.max() <= 1.0 + 1e-3
    assert np.mean(emulated_steps < 0.5) >= np.mean(plain_steps < 0.5) + 0.05
    assert np.mean(emulated_steps < 0.5) >= 0.85
