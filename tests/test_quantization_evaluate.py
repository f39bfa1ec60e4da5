"""qat_evaluate / switch_to_stable_exponents / tflite_scale_report: the run the CLI and
the methods benchmark share, checked against the model's variables and LiteRT."""
import numpy as np
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras
from keras_coherence.quantization import qat as q_qat
from keras_coherence.quantization.export import integer_weights
from keras_coherence.quantization.evaluate import StepTimer, qat_evaluate, tflite_scale_report


def _float_model():
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, n)


def test_stable_switch_freezes_exponents_on_the_rounded_ema():
    keras.utils.set_random_seed(0)
    model = _float_model()
    train, test = _data(64, 0), _data(32, 1)
    result = qat_evaluate(model, train, test, method="msqe", quantizer_options={"stable_exponent": True},
                          qat_epochs=2, batch_size=16, stable_switch_epoch=1,
                          optimizer=keras.optimizers.SGD(0.5))
    kernels = q_qat.quantized_kernels(result["qmodel"])
    assert len(kernels) == 2
    for k in kernels:
        assert float(k.state["use_stable"].numpy()) == 1.0
        np.testing.assert_array_equal(k.state["exponent"].numpy(), np.round(k.state["stable_exponent"].numpy()))
    # After the switch (epoch 2: steps 5-8) no exponent moves.
    rows = [r for r in result["monitor"].history if r["step"] > 5]
    assert rows and all(r["flips"] == 0 for r in rows)
    # Accuracies recomputed from the returned models.
    x, y = test
    keras_acc = np.mean(result["qmodel"].predict(x, verbose=0).argmax(1) == y)
    assert result["accuracy"]["quantized_keras"] == pytest.approx(keras_acc)
    assert result["accuracy"]["float"] == pytest.approx(np.mean(model.predict(x, verbose=0).argmax(1) == y))


def test_tflite_report_and_step_times():
    keras.utils.set_random_seed(1)
    result = qat_evaluate(_float_model(), _data(48, 2), _data(16, 3), method="msqe_baseline", qat_epochs=1,
                          batch_size=16)
    info = result["tflite_info"]
    assert info["bytes"] == len(result["tflite"])
    assert info["weight_tensors"] == 2 and info["all_scales_po2"] and info["zero_points_zero"]
    codes = [np.abs(k.codes.astype(int)).max() for k in integer_weights(result["qmodel"]).values()]
    assert info["max_abs_weight_code"] == max(codes)  # the file's integers are the Keras quantizer's codes
    assert 0 < result["step_ms"] <= result["seconds"]["qat"] * 1e3  # a median batch within the fit
    assert result["monitor"] is not None and len(result["monitor"].totals) == 3


def test_scale_report_sees_float_scales():
    # Post-training int8 weights of a float model get max|w| / 127 scales: not PO2.
    from keras_coherence._keras import tf

    keras.utils.set_random_seed(2)
    model = _float_model()
    model.layers[1].set_weights([np.random.default_rng(0).normal(size=(3, 3, 1, 4)).astype(np.float32)])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    x = _data(8, 0)[0]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(8))
    tflite_model = converter.convert()
    report = tflite_scale_report(tflite_model)
    assert report["weight_tensors"] == 2
    # Reference: the filter tensors' scales read straight from LiteRT's tensor details.
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite_model)
    details = {d["index"]: d for d in interp.get_tensor_details()}
    filters = [details[int(op["inputs"][1])] for op in interp._get_ops_details()
               if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    po2 = [bool(np.all(np.log2(f["quantization_parameters"]["scales"]) % 1 == 0)) for f in filters]
    assert len(filters) == 2 and report["po2_tensors"] == sum(po2) and not all(po2)
    assert not report["all_scales_po2"]


def test_step_timer_median_skips_the_first_batch():
    timer = StepTimer()
    timer.on_train_begin()
    timer.times = [10.0, 0.001, 0.003, 0.002]
    assert timer.median_ms() == pytest.approx(2.0)
    assert timer.median_ms(skip=0) == pytest.approx(2.5)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="stable_exponent"):
        qat_evaluate(_float_model(), _data(8, 0), _data(8, 1), method="msqe", stable_switch_epoch=1)
    with pytest.raises(ValueError, match="8-bit"):
        qat_evaluate(_float_model(), _data(8, 0), _data(8, 1), method="tfmot8", bits=4)


def test_logit_steps_against_the_output_scale():
    from keras_coherence.quantization.export import run_tflite, tflite_output_step

    keras.utils.set_random_seed(3)
    result = qat_evaluate(_float_model(), _data(32, 4), _data(16, 5), method="learned", batch_size=16)
    # The dequantized LiteRT outputs lie on the grid of the step read from the file.
    step = tflite_output_step(result["tflite"])
    lite = run_tflite(result["tflite"], _data(16, 5)[0])
    codes = lite / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert step > 0
    keras_logits = result["qmodel"].predict(_data(16, 5)[0], verbose=0)
    expected = np.abs(keras_logits - lite) / step
    assert result["logit_steps"]["max"] == pytest.approx(float(expected.max()), rel=1e-5, abs=1e-6)
    assert result["logit_steps"]["within_1"] == pytest.approx(float(np.mean(expected <= 1.0 + 1e-3)))
    assert result["logit_steps"]["p99"] == pytest.approx(float(np.percentile(expected, 99)), rel=1e-5, abs=1e-6)
