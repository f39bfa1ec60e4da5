"""litert_rounding: the Keras QAT model's inference rounding as LiteRT does.

References: LiteRT itself (the exported model's outputs), and TFLite's
QuantizeMultiplier / MultiplyByQuantizedMultiplier written out by hand for a few
multipliers (integer arithmetic checked digit by digit)."""
import re

import numpy as np
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras, tf
from keras_coherence.quantization import quantize_model
from keras_coherence.quantization.export import run_tflite, tflite_output_step, to_integer_tflite
from keras_coherence.quantization.litert import _requantize_tf, litert_rounding, quantize_multiplier, requantize


def test_quantize_multiplier_by_hand():
    # 0.25108808 = 0.50217616 * 2**-1 -> q31 = round(0.50217616 * 2**31)
    q31, shift = quantize_multiplier(np.array([0.25108808, 0.5, 1.5, 0.0625]))
    assert list(shift) == [-1, 0, 1, -3]
    assert q31[0] == round(0.50217616 * 2 ** 31)
    assert list(q31[1:]) == [2 ** 30, 3 * 2 ** 29, 2 ** 30]


# m = q31 / 2**31 * 2**shift; v = (acc * q31 + nudge) / 2**31 truncated, nudge = 2**30
# (1 - 2**30 below zero); then v >> -shift, plus 1 if the remainder exceeds half (for
# v < 0: half or more) -- "double". "double_half_up" adds half and shifts (ties go up).
# "single": (acc * q31 + 2**(30 - shift)) >> (31 - shift).
@pytest.mark.parametrize("acc, m, double, half_up, single", [
    (5, 0.5, 3, 3, 3),      # q31 = 2**30, shift 0: (5 * 2**30 + 2**30) / 2**31 = 3; single: 2.5 + 0.5 -> 3
    (-5, 0.5, -2, -2, -2),  # (-5 * 2**30 + 1 - 2**30) / 2**31 = -2.99.. -> -2; single: floor(-2.5 + 0.5) = -2
    (7, 0.25, 2, 2, 2),     # shift -1: v = 4, 4 >> 1 = 2, remainder 0; single: floor(1.75 + 0.5) = 2
    (5, 0.25, 2, 2, 1),     # v = 3, 3 >> 1 = 1, remainder 1 > 0 -> 2; half up: (3 + 1) >> 1 = 2; single 1.25 -> 1
    (-7, 0.25, -2, -1, -2),  # v = -3: -3 >> 1 = -2, remainder 1, threshold 1 -> -2; half up (-3 + 1) >> 1 = -1
    (-3, 0.25, -1, 0, -1),  # v = (-3 * 2**30 + 1 - 2**30) / 2**31 -> -1; -1 >> 1 = -1 (+0); half up: 0 >> 1 = 0
])
def test_requantize_by_hand(acc, m, double, half_up, single):
    for rounding, expected in (("double", double), ("double_half_up", half_up), ("single", single)):
        assert int(requantize(np.array([acc]), np.array([m]), rounding)[0]) == expected, rounding


def test_requantize_rejects_an_unknown_rounding():
    with pytest.raises(ValueError, match="rounding='nearest'.*double"):
        requantize(np.array([1]), np.array([0.5]), "nearest")


def test_double_rounding_differs_from_single_rounding_just_above_a_power_of_two():
    m = np.array([0.2511])
    acc = np.arange(-400, 400)
    single = np.floor(acc * m[0] + 0.5)
    double = requantize(acc, m)
    assert np.all(np.abs(double - single) <= 1)
    assert np.any(double != single)  # the effect the module exists for


@pytest.mark.parametrize("rounding", ["double", "double_half_up", "single"])
def test_tf_and_numpy_requantize_agree(rounding):
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.uniform(1e-4, 3.0, 30), [0.5, 0.25, 1.0, 2.0 ** -7]])
    acc = rng.integers(-(2 ** 20), 2 ** 20, size=(64, m.size))
    acc[:, :4] = [-3, -7, 5, -5]  # ties of the final shift
    got = _requantize_tf(tf.constant(acc, tf.int64), tf.constant(m, tf.float64), rounding).numpy()
    np.testing.assert_array_equal(got, requantize(acc, m, rounding))


def _mixed_net(head):
    """Every emulated case: ReLU6-fused conv and depthwise, linear (bottleneck) conv and
    depthwise outputs, a residual ADD, global average pooling (``keepdims`` False or
    True: two MEAN kernels) and a dense head."""
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(6.0, name="relu1")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    y = keras.layers.ReLU(6.0, name="relu2")(y)
    y = keras.layers.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = keras.layers.BatchNormalization(name="bn3")(y)
    z = keras.layers.DepthwiseConv2D(3, padding="same", name="dw_linear")(x)
    x = keras.layers.Add(name="add")([y, z])
    x = keras.layers.GlobalAveragePooling2D(name="gap", keepdims=head == "pool_keepdims")(x)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inp, keras.layers.Dense(5, name="dense")(x))


def _identity_pool_net(head):
    """MobileNetV1's head on a 1x1 map: the converter drops the keepdims MEAN (and its
    requantization) and quantizes the next conv's bias with the dropped tensor's scale."""
    inp = keras.Input((3, 3, 3))
    x = keras.layers.Conv2D(16, 3, use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(6.0, name="relu1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap", keepdims=True)(x)
    x = keras.layers.Dropout(0.1, name="drop")(x)
    x = keras.layers.Conv2D(5, 1, name="preds")(x)
    return keras.Model(inp, keras.layers.Reshape((5,), name="logits")(x))


_MIXED = ["quantize_layer", "conv", "dw", "project", "dw_linear", "dense", "quant_add", "quant_gap"]
_NETS = {"pool": (_mixed_net, (12, 12, 3), _MIXED), "pool_keepdims": (_mixed_net, (12, 12, 3), _MIXED),
         "identity_pool": (_identity_pool_net, (3, 3, 3), ["quantize_layer", "conv", "preds", "quant_gap"])}


@pytest.fixture(scope="module", params=list(_NETS))
def mixed_qat(request):
    build, shape, emulated = _NETS[request.param]
    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(4)
    x = rng.random((96, *shape), dtype=np.float32)
    model = quantize_model(build(request.param), bits=4, method="msqe_baseline", calibration_data=x)
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(96, 5)).astype(np.float32), batch_size=16, verbose=0)
    return model, to_integer_tflite(model), x, emulated


@pytest.mark.parametrize("kernels", ["optimized", "reference"])
def test_emulated_keras_equals_litert(mixed_qat, kernels):
    model, tflite_model, x, expected = mixed_qat
    lite = run_tflite(tflite_model, x, kernels=kernels)
    step = tflite_output_step(tflite_model)
    plain = model.predict(x, verbose=0)
    with litert_rounding(model, kernels=kernels) as report:
        emulated = model.predict(x, verbose=0)
    patched = [re.sub(r"^quantize_layer_\d+$", "quantize_layer", name) for name in report["patched"]]  # auto name
    assert sorted(patched) == sorted(expected) and not report["skipped"]
    # Restored afterwards: the plain fake-quant output again.
    np.testing.assert_array_equal(model.predict(x, verbose=0), plain)
    # Every logit is LiteRT's own (the same int8 code); the plain fake-quant is not.
    np.testing.assert_array_less(np.abs(emulated - lite) / step, 1e-3)
    assert np.mean(np.abs(plain - lite) / step > 0.5) > 0.02


def test_the_two_kernel_sets_round_differently(mixed_qat):
    model, tflite_model, x, _ = mixed_qat
    optimized, reference = (run_tflite(tflite_model, x, kernels=k) for k in ("optimized", "reference"))
    assert np.any(optimized != reference)  # what litert_rounding's kernels argument is for


def test_litert_rounding_rejects_unknown_kernels(mixed_qat):
    with pytest.raises(ValueError, match="kernels='xnnpack'.*optimized"):
        with litert_rounding(mixed_qat[0], kernels="xnnpack"):
            pass


# ------------------------------------------- every PO2 method at 2, 4 and 8 bits
_METHODS = ("msqe_baseline", "msqe", "learned")  # qat.METHODS without its aliases
_BITS = (2, 4, 8)


def test_the_method_list_covers_qat_methods():
    from keras_coherence.quantization.qat import METHODS
    from keras_coherence.quantization.quantizers import ALIASES

    own = {alias for alias in METHODS.values() if ALIASES[alias].__module__.startswith("keras_coherence.")}
    assert {METHODS[m] for m in _METHODS} == own  # (a test's toy quantizer is not the package's)


@pytest.fixture(scope="module")
def every_method():
    """``{(method, bits): (model, tflite bytes)}`` of ``_mixed_net("pool")`` (conv,
    depthwise, residual ADD, MEAN, dense): quantized, activation ranges calibrated,
    one eager training call on 64 samples (each method picks its exponents, the learned
    one initializes its scales), exported. Eager calls: no graph tracing, a few seconds each."""
    rng = np.random.default_rng(11)
    x = rng.random((64, 12, 12, 3), dtype=np.float32)
    out = {}
    for method in _METHODS:
        for bits in _BITS:
            keras.utils.set_random_seed(bits)
            model = quantize_model(_mixed_net("pool"), bits=bits, method=method, calibration_data=x)
            model(x, training=True)
            out[method, bits] = model, to_integer_tflite(model)
    return out, x


@pytest.mark.parametrize("bits", _BITS)
@pytest.mark.parametrize("method", _METHODS)
def test_every_method_and_bit_width_is_bit_exact_against_litert(every_method, method, bits):
    models, x = every_method
    model, tflite_model = models[method, bits]
    lite = run_tflite(tflite_model, x)
    step = tflite_output_step(tflite_model)
    with litert_rounding(model) as report:
        emulated = model(x, training=False).numpy()
    assert not report["skipped"] and len(report["patched"]) == len(_MIXED)
    # The same int8 output code for every logit: the dequantized values agree to float
    # rounding, and both lie on LiteRT's output grid.
    np.testing.assert_array_equal(np.round(emulated / step), np.round(lite / step))
    np.testing.assert_allclose(emulated, lite, rtol=0, atol=1e-3 * step)
    # The exported kernels are the bit width's integers on PO2 scales.
    qp = 2 ** (bits - 1) - 1
    from keras_coherence.quantization.export import tflite_kernels

    for k in tflite_kernels(tflite_model):
        assert np.abs(k["values"].astype(int)).max() <= qp
        assert np.all(np.frexp(k["scales"])[0] == 0.5), k["name"]
