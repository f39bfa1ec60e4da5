"""The ``quantize`` command, its demo section and the MobileNet builders.

The numbers the command reports are recomputed here from its files: the TFLite
accuracy by running the written ``model.tflite`` with the LiteRT interpreter, the
power-of-two check from the interpreter's tensor details, and the totals from the
per-layer CSV.
"""
import json
import math

import numpy as np
import pytest
from conftest import assert_png, read_csv, assert_help_lists, assert_one_line_usage_error

from keras_coherence import cli, data, models

pytestmark = pytest.mark.usefixtures("cache_in_tmp")

TINY = ["--model", "mlp", "--hidden", "16", "--max-train", "256", "--batch-size", "64", "--float-epochs", "1",
        "--qat-epochs", "1", "--quiet", "--seed", "1"]
_WEIGHT_OPS = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1}  # op -> index of its weight input


@pytest.fixture(scope="module")
def tiny_quantize(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize")
    code = cli.main(["quantize", *TINY, "--bits", "4", "--method", "msqe", "--out", str(out)])
    return code, out


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    return Interpreter(model_path=str(path),
                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def _tflite_accuracy(path, x, y):
    interp = _interpreter(path)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x.astype(np.float32))
    interp.invoke()
    return float(np.mean(interp.get_tensor(out["index"]).argmax(1) == y))


def _weight_tensors(path):
    """(name, scales, zero points, int values) of each conv / fully-connected weight tensor."""
    interp = _interpreter(path)
    interp.allocate_tensors()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    out = []
    for op in interp._get_ops_details():
        if op["op_name"] in _WEIGHT_OPS:
            d = details[int(op["inputs"][_WEIGHT_OPS[op["op_name"]]])]
            q = d["quantization_parameters"]
            out.append((d["name"], np.asarray(q["scales"], np.float64), np.asarray(q["zero_points"]),
                        np.array(interp.get_tensor(d["index"])).astype(np.int64)))
    return out


def test_quantize_reports_what_its_files_hold(tiny_quantize):
    code, out = tiny_quantize
    assert code == 0
    for name in ("quantize.csv", "quantize.png", "model.tflite", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "quantize" and summary["quantization"]["bits"] == 4
    assert summary["training"]["qat_steps"] == 4  # 256 examples in batches of 64

    # TFLite accuracy and agreement, recomputed from the written file
    x_test, y_test = data.load_dataset("embedded_mnist", split="test")
    acc = summary["accuracy"]
    assert acc["tflite"] == _tflite_accuracy(out / "model.tflite", x_test, y_test)
    assert acc["keras_tflite_agreement"] >= 0.98
    assert abs(acc["quantized_keras"] - acc["tflite"]) <= 0.02
    # the float model's accuracy on the 1,000 test images is a whole count of them
    assert acc["float"] * len(y_test) == pytest.approx(round(acc["float"] * len(y_test)))

    # every weight tensor: exact power-of-two scales (integer log2), zero point 0, |code| <= 7
    tensors = _weight_tensors(out / "model.tflite")
    assert len(tensors) == summary["tflite"]["weight_tensors"] == 2
    for _, scales, zero_points, values in tensors:
        log2 = np.log2(scales)
        assert scales.size >= 1 and np.all(log2 == np.round(log2))
        assert np.all(zero_points == 0) and np.abs(values).max() <= 7
    assert summary["tflite"]["all_scales_po2"] is True and summary["tflite"]["zero_points_zero"] is True
    assert summary["tflite"]["max_abs_weight_code"] == max(np.abs(v).max() for *_, v in tensors)

    # the monitor's CSV: one row per layer per QAT step; totals recomputed from it
    rows = read_csv(out / "quantize.csv")
    assert [(int(r["step"]), r["layer"]) for r in rows] == [
        (s, name) for s in range(1, 5) for name in ("dense_1", "logits")]
    scales = summary["scales"]
    assert scales["records"] == 4
    assert scales["flips"] == sum(int(r["flips"]) for r in rows)
    final = {r["layer"]: r for r in rows if int(r["step"]) == 4}
    sizes = {"dense_1": 784 * 16, "logits": 16 * 10}  # weights per quantized kernel
    total = sum(sizes.values())
    assert scales["final"]["msqe"] == pytest.approx(
        sum(float(final[k]["msqe"]) * n for k, n in sizes.items()) / total, rel=1e-9)
    assert scales["final"]["clip_fraction"] == pytest.approx(
        sum(float(final[k]["clip_fraction"]) * n for k, n in sizes.items()) / total, rel=1e-9)
    # the exported scale of each Dense kernel is 2**(its last recorded exponent)
    exported = sorted(float(np.log2(s[0])) for _, s, _, _ in tensors)
    assert exported == sorted(float(final[k]["exponent"]) for k in sizes)
    assert_png(out / "quantize.png")


def test_quantize_prints_the_comparison(tiny_quantize, tmp_path, capsys):
    code = cli.main(["quantize", *TINY, "--method", "learned", "--bits", "3", "--no-per-channel",
                     "--every-n-steps", "2", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    acc = summary["accuracy"]
    assert f"float {acc['float']:.3f}, quantized (Keras) {acc['quantized_keras']:.3f}, TFLite " \
           f"{acc['tflite']:.3f}" in printed
    assert "have exact power-of-two scales (all: yes)" in printed
    assert summary["tflite"]["max_abs_weight_code"] <= 3
    rows = read_csv(tmp_path / "quantize.csv")
    assert sorted({int(r["step"]) for r in rows}) == [2, 4] and {r["quantizer"] for r in rows} == {"LearnedPo2"}


def test_tfmot8_reference_has_float_scales(tmp_path):
    code = cli.main(["quantize", *TINY, "--hidden", "8", "--max-train", "128", "--method", "tfmot8",
                     "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quantization"]["bits"] == 8 and summary["scales"] is None
    assert not (tmp_path / "quantize.csv").exists()
    tensors = _weight_tensors(tmp_path / "model.tflite")
    po2 = [bool(np.all(np.log2(s) == np.round(np.log2(s)))) for _, s, _, _ in tensors]
    assert summary["tflite"]["all_scales_po2"] is all(po2) is False
    assert summary["tflite"]["po2_tensors"] == sum(po2)
    x_test, y_test = data.load_dataset("embedded_mnist", split="test")
    assert summary["accuracy"]["tflite"] == _tflite_accuracy(tmp_path / "model.tflite", x_test, y_test)


@pytest.mark.parametrize("extra, fragment", [
    (["--bits", "9"], "--bits"),
    (["--bits", "x"], "--bits"),
    (["--method", "nope"], "--method"),
    (["--model", "resnet"], "--model"),
    (["--qat-epochs", "0"], "--qat-epochs"),
    (["--method", "tfmot8", "--bits", "4"], "tfmot8"),
    (["--alpha", "0.5"], "--alpha"),
    (["--model", "small_cnn", "--hidden", "8"], "--hidden"),
])
def test_bad_arguments_exit_2_with_one_line(extra, fragment, capsys, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["quantize", "--max-train", "64", "--quiet", *extra, "--out", str(out)]) == 2
    assert_one_line_usage_error(capsys, fragment)
    assert not (out / "summary.json").exists()


def test_quantize_help(capsys):
    assert_help_lists(capsys, cli.main, "quantize", ("--bits", "--method", "--float-epochs", "--qat-epochs", "tfmot8", "mobilenet_v2"), absent=("--label-noise",))


# ------------------------------------------------------------------------ models


@pytest.mark.parametrize("name, params", [("mobilenet_v1", 221114), ("mobilenet_v2", 423018)])
def test_mobilenet_builders(name, params):
    model = models.build_float_model(name, (32, 32, 3), 10)
    assert model.name == name and model.output_shape == (None, 10) and model.count_params() == params
    assert model.layers[-1].activation.__name__ == "linear"  # logits
    assert models.build_float_model(name, (32, 32, 1), 3, alpha=0.25).output_shape == (None, 3)
    with pytest.raises(ValueError, match="at least 32x32.*pad_images"):
        models.build_float_model(name, (28, 28, 1), 10)
    with pytest.raises(ValueError, match="alpha"):
        models.build_float_model(name, (32, 32, 3), 10, alpha=0)


def test_pad_images():
    x = np.arange(2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28, 1)
    y = models.pad_images(x)
    assert y.shape == (2, 32, 32, 3) and y.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(y[:, 2:30, 2:30, c], x[..., 0])
    assert float(np.abs(y).sum()) == pytest.approx(3 * float(x.sum()))  # zeros around
    assert models.pad_images(np.ones((1, 32, 32, 3))).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="do not fit"):
        models.pad_images(np.ones((1, 40, 40, 1)))
    with pytest.raises(ValueError, match="channels"):
        models.pad_images(np.ones((1, 28, 28, 2)))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        models.pad_images(np.ones((28, 28)))
    assert math.isfinite(float(y.mean()))
