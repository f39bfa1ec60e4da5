"""The ``bnn`` command and its demo section.

The figures it reports are recomputed here from other sources: the memory table from the
per-layer formulas of docs/binary.md written out for the tiny MLP; the Keras test accuracy by writing the weights held in
the exported training model (LiteRT ``get_weights``, which also holds Keras's Adam moments)
into a freshly built model; the LCE accuracy by running the written LCE file in LCE's own interpreter; the on-device losses
and accuracy by running the printed ``python -m edge`` command lines on the written files.
"""
import json
import os
import shlex

import numpy as np
import pytest
from conftest import read_csv, assert_help_lists, assert_one_line_usage_error

from keras_coherence import cli, data
from keras_coherence._keras import keras
from keras_coherence.binary import export_lce, export_training
from keras_coherence.binary.memory import COLUMNS
from keras_coherence.binary.models import build_binary_model
from keras_coherence.workflows import bnn as bnn_workflow

pytestmark = pytest.mark.usefixtures("cache_in_tmp")

# 256 examples in batches of 64: the 4 device steps are exactly one `edge train` epoch
TINY = ["--hidden", "16", "--max-train", "256", "--batch-size", "64", "--epochs", "1", "--device-steps", "4",
        "--quiet", "--seed", "1"]
SHAPE, CLASSES = (28, 28, 1), 10


@pytest.fixture(scope="module")
def tiny_bnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("bnn")
    code = cli.main(["bnn", *TINY, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text()) if code == 0 else None
    return code, out, summary


def _tiny_mlp_memory_rows(method, batch):
    """``{layer: {column: bits}}`` of the 784-16-10 MLP from docs/binary.md's formulas (Adam:
    2 slots of 32 bits; low-memory: float16 latent weights and activation gradients, 1-bit
    kernel gradients, sign + STE-mask bits for a binary layer's input, l1 batch norm)."""
    low, b = method == "low_memory", batch
    gx = 16 if low else 32
    rows = {"input": {}, "flatten": {}}
    for name, bn, n_in, n_out, first in (("fc_1", "bn_fc_1", 784, 16, True), ("logits", "logits_bn", 16, 10, False)):
        w = n_in * n_out
        rows[name] = {"weights": w, "latent_weights": (16 if low else 32) * w, "weight_gradients": (1 if low else 32) * w,
                      "optimizer_slots": 64 * w, "statistics": 0,
                      "saved_activations": b * n_in * (2 if low and not first else 32),
                      "gradient_buffers": b * (n_in + n_out) * gx}
        c = n_out
        if low:
            rows[bn] = {"weights": c, "latent_weights": 16 * c, "weight_gradients": 16 * c, "optimizer_slots": 64 * c,
                        "statistics": 32 * c, "saved_activations": b * c + 32 * c, "gradient_buffers": b * 2 * c * 16}
        else:
            rows[bn] = {"weights": 2 * c, "latent_weights": 64 * c, "weight_gradients": 64 * c,
                        "optimizer_slots": 128 * c, "statistics": 64 * c, "saved_activations": b * c * 32 + 64 * c,
                        "gradient_buffers": b * 2 * c * 32}
    empty = dict.fromkeys(("weights",) + COLUMNS, 0)
    rows = {name: {**empty, **row} for name, row in rows.items()}
    order = ("input", "flatten", "fc_1", "bn_fc_1", "logits", "logits_bn")
    return {name: rows[name] for name in order}


def _test_data(n=256, seed=1):
    return data.load_dataset("embedded_mnist", split="test", max_examples=n, seed=seed)


def test_bnn_writes_data_and_memory_figures(tiny_bnn):
    code, out, summary = tiny_bnn
    assert code == 0
    export = out / "export"
    for path in (out / "memory.csv", export / "model_lce.tflite", export / "model_train.tflite",
                 export / "train.npz", export / "test.npz"):
        assert path.is_file(), path
    assert summary["command"] == "bnn" and summary["model"]["method"] == "low_memory"
    assert summary["data"]["num_train"] == summary["data"]["num_test"] == 256

    # the .npz data are the embedded MNIST subset scaled to [-1, 1], integer labels
    (x, y), _ = data.load_dataset("embedded_mnist", max_examples=256, seed=1)
    with np.load(export / "train.npz") as train:
        np.testing.assert_array_equal(train["x"], x * 2.0 - 1.0)
        np.testing.assert_array_equal(train["y"], y)
        assert train["y"].dtype == np.int32

    # the memory table: every CSV row and the totals from the documented formulas
    memory = summary["memory"]
    rows = read_csv(out / "memory.csv")
    expected = {m: _tiny_mlp_memory_rows(m, batch=64) for m in ("standard", "low_memory")}
    assert [(r["method"], r["layer"]) for r in rows] == [(m, name) for m in expected for name in expected[m]]
    for r in rows:
        want = expected[r["method"]][r["layer"]]
        assert {c: int(r[c]) for c in want} == want, (r["method"], r["layer"])
    peaks = {}
    for m, by_layer in expected.items():
        totals = {c: sum(row[c] for row in by_layer.values()) for c in COLUMNS[:-1]}
        totals["gradient_buffers"] = max(row["gradient_buffers"] for row in by_layer.values())
        totals["peak"] = peaks[m] = sum(totals.values())
        assert memory["bits"][m] == totals
        assert memory["mib"][m]["peak"] == pytest.approx(totals["peak"] / 8 / 2 ** 20, rel=1e-12)
    assert memory["ratio"] == pytest.approx(peaks["standard"] / peaks["low_memory"], rel=1e-12)


def test_bnn_accuracies_from_the_written_files(tiny_bnn):
    from ai_edge_litert.interpreter import Interpreter
    from larq_compute_engine.tflite.python.interpreter import Interpreter as LceInterpreter

    _, out, summary = tiny_bnn
    x_test, y_test = _test_data()
    x_test = x_test * 2.0 - 1.0
    interp = Interpreter(model_path=str(out / "export" / "model_train.tflite"))
    assert set(interp.get_signature_list()) == {"train", "infer", "get_weights", "set_weights"}
    assert summary["device"]["signatures"] == sorted(interp.get_signature_list())

    # the training file holds the Keras-trained weights: a fresh model with them has the
    # test accuracy the command reports
    state = interp.get_signature_runner("get_weights")()
    # ... and Keras's Adam state after its 4 steps (256 examples, batch 64), not fresh moments
    assert summary["device"]["adam_moments"] == "from Keras" and float(state["adam_step"]) == 4.0
    assert np.abs(state["adam_v_fc_1_kernel"]).max() > 0 and np.abs(state["adam_m_logits_kernel"]).max() > 0
    fresh = build_binary_model("mlp", "low_memory", input_shape=SHAPE, num_classes=CLASSES, hidden=(16,))
    export_training.set_keras_weights(fresh, state)
    fresh.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    _, keras_acc = fresh.evaluate(x_test, y_test, batch_size=64, verbose=0)
    assert summary["accuracy"]["test"] == pytest.approx(keras_acc, abs=1e-6)
    logits = interp.get_signature_runner("infer")(x=x_test)["logits"]
    assert summary["device"]["accuracy_before"] == float(np.mean(logits.argmax(-1) == y_test))

    # the LCE file in LCE's interpreter
    lce_bytes = (out / "export" / "model_lce.tflite").read_bytes()
    lce_logits = np.asarray(LceInterpreter(lce_bytes).predict(x_test))
    assert summary["accuracy"]["lce_test"] == float(np.mean(lce_logits.argmax(-1) == y_test))
    np.testing.assert_allclose(lce_logits, fresh.predict(x_test, verbose=0), atol=1e-4)
    lce = summary["lce"]
    assert lce["bytes"] == len(lce_bytes) < lce["float_tflite_bytes"]
    assert "LceBconv2d" in lce["ops"] and lce["keras_argmax_agreement"] == 1.0
    assert export_lce.tflite_ops(lce_bytes) == lce["ops"]


def test_printed_edge_commands_repeat_the_device_steps(tiny_bnn, tmp_path, capsys):
    from edge.__main__ import main as edge_main

    _, out, summary = tiny_bnn
    device, commands = summary["device"], summary["edge_commands"]
    assert device["steps"] == len(device["losses"]) == 4 and device["optimizer"] == "adam"
    train = shlex.split(commands["train"])
    assert train[:4] == ["python", "-m", "edge", "train"] and str(out / "export" / "model_train.tflite") in train
    log = tmp_path / "losses.csv"
    assert edge_main(train[3:] + ["--no-progress", "--loss-log", str(log)]) == 0
    edge_losses = [float(line.split(",")[2]) for line in log.read_text().split()]
    np.testing.assert_allclose(edge_losses, device["losses"], rtol=1e-6)
    assert device["first_loss"] == device["losses"][0] and device["last_loss"] == device["losses"][-1]
    capsys.readouterr()
    assert edge_main(shlex.split(commands["infer"])[3:]) == 0
    infer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert infer["accuracy"] == device["accuracy_after"] and infer["examples"] == 256


def test_bnn_standard_bop_prints_and_exports_where_told(tmp_path, capsys):
    export = tmp_path / "elsewhere"
    code = cli.main(["bnn", *TINY, "--hidden", "8", "--max-train", "128", "--device-steps", "2",
                     "--method", "standard", "--optimizer", "bop", "--export", str(export),
                     "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["training"]["optimizer"] == "bop" and summary["model"]["method"] == "standard"
    assert summary["device"]["adam_moments"] == "fresh"  # Bop's state has no Adam moments to carry over
    assert list(summary["memory"]["bits"]) == ["standard"] and summary["memory"]["ratio"] == 1.0
    assert (export / "model_lce.tflite").is_file() and (export / "model_train.tflite").is_file()
    assert not (tmp_path / "out" / "export").exists()
    assert f"test accuracy {summary['accuracy']['test']:.3f}" in printed
    assert f"{summary['memory']['mib']['standard']['peak']:.3f}" in printed and "1.00x" in printed
    assert summary["edge_commands"]["train"] in printed
    assert " ".join(f"{v:.4f}" for v in summary["device"]["losses"]) in printed


def _failing_to_training_tflite(module):
    raise ValueError("the training model needs non-builtin ops ['Conv2DBackpropFilter']")


def test_training_export_failure_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_training, "to_training_tflite", _failing_to_training_tflite)
    out = tmp_path / "bnn"
    out.mkdir()
    (out / "summary.json").write_text('{"previous": true}')
    code = cli.main(["bnn", *TINY, "--hidden", "8", "--max-train", "128", "--out", str(out)])
    assert code == 2
    assert_one_line_usage_error(capsys, "on-device training export of --model mlp --method low_memory failed: "
                                        "the training model needs non-builtin ops ['Conv2DBackpropFilter'] "
                                        "(pass --no-device-export")
    # a failed run replaces nothing: the previous results stay, no partial files are left
    assert sorted(os.listdir(out)) == ["summary.json"]
    assert json.loads((out / "summary.json").read_text()) == {"previous": True}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging folder


def test_no_device_export_skips_the_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_training, "to_training_tflite", _failing_to_training_tflite)  # never reached
    code = cli.main(["bnn", *TINY, "--hidden", "8", "--max-train", "128", "--no-device-export",
                     "--out", str(tmp_path)])
    assert code == 0
    assert "on-device training model: skipped (--no-device-export)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == {"file": None, "error": None, "skipped": "--no-device-export"}
    assert summary["config"]["no_device_export"] is True and summary["edge_commands"] is None
    assert summary["accuracy"]["device_test_after_steps"] is None
    assert (tmp_path / "export" / "model_lce.tflite").is_file()
    assert not (tmp_path / "export" / "model_train.tflite").exists()


def _tiny_adam_model():
    model = build_binary_model("mlp", "low_memory", input_shape=(4, 4, 1), num_classes=3, hidden=(6,))
    return model, export_training.TrainingModule(model)


def test_keras_adam_state_is_the_moments_of_the_step():
    """After one Keras Adam step, m = (1 - beta_1) g and v = (1 - beta_2) g^2 with g the
    gradient at the initial weights, computed here with a GradientTape."""
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    model, module = _tiny_adam_model()
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (8, 4, 4, 1)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = dict(zip((export_training.state_name(v.name) for v in model.trainable_variables),
                     (g.numpy() for g in tape.gradient(loss, model.trainable_variables))))
    # the same model: the tape changed no trainable weight (only batch-norm moving statistics)
    model.compile(keras.optimizers.Adam(1e-3), loss_fn)
    model.train_on_batch(x, y)
    state = bnn_workflow.keras_adam_state(module, model.optimizer)
    assert float(state["adam_step"]) == 1.0
    assert set(state) == {"adam_step"} | {f"adam_{k}_{n}" for n in module.trainable_names for k in "mv"}
    for name, g in grads.items():
        np.testing.assert_allclose(state[f"adam_m_{name}"], 0.1 * g, rtol=1e-4, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(state[f"adam_v_{name}"], 0.001 * g * g, rtol=1e-4, atol=1e-12, err_msg=name)


def test_keras_adam_state_refuses_partial_state_and_bop_is_fresh():
    from keras_coherence.binary.training import make_optimizer

    model, module = _tiny_adam_model()
    adam = keras.optimizers.Adam(1e-3)
    kernel = model.get_layer("fc_1").kernel
    adam.apply_gradients([(keras.backend.zeros_like(kernel), kernel)])   # only one variable has moments
    with pytest.raises(ValueError, match=r"cannot be carried to the device: no moments for \['adam_m_bn_fc_1_beta'"):
        bnn_workflow.keras_adam_state(module, adam)
    # Bop's state is no Adam moment: the documented choice is fresh device moments
    assert bnn_workflow.keras_adam_state(module, make_optimizer("bop")) is None


@pytest.mark.parametrize("extra, fragment", [
    (["--model", "cnv"], "32x32"),
    (["--model", "resnet_e18"], "32x32"),
    (["--model", "binarynet", "--hidden", "8"], "--hidden"),
    (["--batch-size", "500"], "--batch-size"),
    (["--method", "nope"], "--method"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--device-steps", "0"], "--device-steps"),
    (["--dataset", "not_a_dataset_xyz"], "not_a_dataset_xyz"),
])
def test_bad_arguments_exit_2_with_one_line(extra, fragment, capsys, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["bnn", "--max-train", "256", "--quiet", *extra, "--out", str(out)]) == 2
    assert_one_line_usage_error(capsys, fragment)
    assert not out.exists()


def test_bnn_help(capsys):
    assert_help_lists(capsys, cli.main, "bnn", ("--method", "--optimizer", "--export", "--device-steps", "low_memory_po2",
                                                "resnet_e18", "--no-device-export"), absent=("--label-noise",))
