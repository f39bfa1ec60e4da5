"""Tests for the command line (keras_coherence.cli), the model builders and the plots."""
import doctest
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_one_line_usage_error
from conftest import assert_png as _assert_png
from conftest import read_csv as _read_csv
from conftest import read_run_outputs

import dataclasses

from keras_coherence import cli, models, plots
from keras_coherence.workflows import _common, demo
from keras_coherence.workflows import coherence as coherence_workflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("cache_in_tmp")


TINY = ["--max-train", "256", "--epochs", "1", "--batch-size", "32", "--probe-size", "64",
        "--every-n-steps", "3", "--hidden", "16", "--quiet", "--seed", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("coherence")
    code = cli.main(["coherence", *TINY, "--label-noise", "0.5", "--out", str(out)])
    return code, out


def test_coherence_writes_consistent_outputs(tiny_run):
    code, out = tiny_run
    assert code == 0
    rows, summary = read_run_outputs(out, "coherence")

    steps_per_epoch = math.ceil(256 / 32)
    assert summary["training"]["steps"] == steps_per_epoch
    assert summary["data"]["num_train"] == 256 and summary["data"]["probe_size"] == 64
    assert summary["data"]["num_corrupted_labels"] == 128
    assert summary["config"]["label_noise"] == 0.5 and summary["config"]["model"] == "mlp"

    # Rows: the start, every 3 steps, and always the final step.
    steps = [int(r["step"]) for r in rows]
    assert steps[0] == 0 and steps[-1] == steps_per_epoch
    assert steps == sorted(set(steps))
    assert set(range(0, steps_per_epoch + 1, 3)) <= set(steps)
    assert summary["m_coherence"]["measurements"] == len(rows)

    values = [float(r["m_coherence"]) for r in rows]
    assert all(0 < v <= 64 for v in values)
    mc = summary["m_coherence"]
    assert mc["first"]["value"] == pytest.approx(values[0], rel=1e-12)
    assert mc["last"]["value"] == pytest.approx(values[-1], rel=1e-12)
    assert mc["last"]["step"] == steps[-1]
    assert mc["peak"]["value"] == pytest.approx(max(values), rel=1e-12)
    assert mc["peak"]["step"] == steps[int(np.argmax(values))]
    for r in rows:  # alpha = m-coherence / m
        assert float(r["alpha"]) == pytest.approx(float(r["m_coherence"]) / 64, rel=1e-9)
    layer_cols = [k for k in rows[0] if k.startswith("m_coherence/")]
    assert layer_cols == ["m_coherence/dense_1", "m_coherence/logits"]

    # Accuracies on 256 training / 1,000 test images are whole counts of examples.
    for key, count in (("train", 256), ("train_clean_labels", 256), ("test", 1000)):
        assert summary["accuracy"][key] * count == pytest.approx(round(summary["accuracy"][key] * count))
    _assert_png(out / "coherence.png")


def test_coherence_first_row_equals_brute_force_on_the_same_initial_model(tiny_run):
    """Step 0 (before any update): rebuild the run's model, data and probe with its
    seed, and compute the probe's m-coherence one example at a time."""
    from keras_coherence._keras import keras
    from reference import coherence_reference

    _, out = tiny_run
    rows, summary = read_run_outputs(out, "coherence")
    args = coherence_workflow.Config(max_train=256, epochs=1, batch_size=32, probe_size=64, every_n_steps=3,
                                     hidden=(16,), quiet=True, seed=1, label_noise=0.5)
    keras.utils.set_random_seed(args.seed)  # the run's own order of random draws
    (x_train, y_train), _, num_classes, input_shape = _common.load_data(args)
    y_fit, _ = _common.noisy_labels(args, y_train, num_classes)
    probe = np.sort(np.random.default_rng(args.seed).choice(len(x_train), size=64, replace=False))
    model = _common.build_float_model(args, input_shape, num_classes)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ref_mc, *_ = coherence_reference(model, loss, x_train[probe], y_fit[probe])
    assert int(rows[0]["step"]) == 0
    assert float(rows[0]["m_coherence"]) == pytest.approx(ref_mc, rel=1e-4)
    assert summary["m_coherence"]["first"]["value"] == pytest.approx(ref_mc, rel=1e-4)


def test_coherence_prints_summary(tiny_run, capsys, tmp_path):
    code = cli.main(["coherence", *TINY, "--no-per-layer", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "m-coherence: first" in printed and "test accuracy" in printed
    assert f"{summary['m_coherence']['last']['value']:.3g}" in printed
    rows = _read_csv(tmp_path / "coherence.csv")
    assert not [k for k in rows[0] if k.startswith("m_coherence/")]  # --no-per-layer


@pytest.mark.parametrize("argv, fragment", [
    (["coherence", "--label-noise", "1.5"], "--label-noise"),
    (["coherence", "--epochs", "0"], "--epochs"),
    (["coherence", "--model", "resnet"], "--model"),
    (["coherence", "--lr", "abc"], "--lr"),
    (["coherence", "--hidden", "12,x"], "--hidden"),
    (["coherence", "--bogus"], "--bogus"),
    (["nosuchcommand"], "nosuchcommand"),
    ([], "COMMAND"),
    (["coherence", "--dataset", "not_a_dataset_xyz", "--quiet"], "not_a_dataset_xyz"),
    (["coherence", "--model", "cnn", "--hidden", "8", "--quiet"], "--hidden"),
    (["demo", "--only", "nope"], "nope"),
])
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys, tmp_path):
    if argv and argv[0] in ("coherence", "demo"):
        argv = argv + ["--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert_one_line_usage_error(capsys, fragment)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_demo_writes_its_sections(tmp_path, capsys, monkeypatch):
    """`demo` runs every section in order into <--out>/<section>/. The sections are shrunk
    here (each section's own test checks its figures; `make demo` runs the full size)."""
    presets = demo.PRESETS
    monkeypatch.setitem(presets, "coherence", dataclasses.replace(presets["coherence"], max_train=200, epochs=1,
                                                                  probe_size=32, every_n_steps=2))
    monkeypatch.setitem(presets, "aggregation", demo.AggregationDemo(
        ("sgd", "winsorized:c=2"), dataclasses.replace(presets["aggregation"].base, max_train=100, epochs=1)))
    monkeypatch.setitem(presets, "quantization", dataclasses.replace(presets["quantization"], hidden=(8,),
                                                                     max_train=128, float_epochs=1, qat_epochs=1))
    monkeypatch.setitem(presets, "bnn", dataclasses.replace(presets["bnn"], hidden=(16,), max_train=256,
                                                            batch_size=64, epochs=1, device_steps=1))
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = tmp_path / "demo"
    assert sorted(os.listdir(out)) == ["aggregation", "bnn", "coherence", "quantization"]
    summary = json.loads((out / "coherence" / "summary.json").read_text())
    assert summary["data"]["num_train"] == 200 and summary["training"]["steps"] == 4
    assert summary["m_coherence"]["last"]["step"] == summary["training"]["steps"]
    _assert_png(out / "coherence" / "coherence.png")
    _assert_png(out / "aggregation" / "aggregation.png")
    quantization = json.loads((out / "quantization" / "summary.json").read_text())
    assert quantization["command"] == "quantize" and quantization["data"]["num_train"] == 128
    assert quantization["quantization"]["method"] == "msqe" and quantization["tflite"]["all_scales_po2"]
    bnn = json.loads((out / "bnn" / "summary.json").read_text())
    assert bnn["command"] == "bnn" and bnn["model"]["method"] == "low_memory" and bnn["training"]["epochs"] == 1
    assert bnn["device"]["steps"] == 1 and (out / "bnn" / "export" / "model_train.tflite").is_file()
    printed = capsys.readouterr().out
    assert "demo finished" in printed and f"results in {out}/" in printed
    # each section's own line (the --only runs are tested with the aggregation section)
    assert "PO2 scales all exact" in printed and "device loss" in printed
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # staging folder gone


def test_help_returns_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "coherence" in capsys.readouterr().out
    assert cli.main(["coherence", "--help"]) == 0
    assert "--probe-size" in capsys.readouterr().out


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "keras_coherence", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "coherence" in result.stdout and "demo" in result.stdout
    assert "python -m keras_coherence" in result.stdout


# ------------------------------------------------------------------------------- models


def test_model_builders():
    m = models.mlp(hidden=(8, 4), num_classes=3)
    assert m.output_shape == (None, 3)
    assert [layer.name for layer in m.layers] == ["input", "flatten", "dense_1", "dense_2", "logits"]
    assert m.layers[-1].activation.__name__ == "linear"  # logits
    cnn = models.build_float_model("cnn")
    assert cnn.output_shape == (None, 10) and cnn.count_params() == 225034
    assert [type(layer).__name__ for layer in cnn.layers[1:]] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    assert models.build_float_model("MLP", (5,), 2, hidden=()).count_params() == 12


@pytest.mark.parametrize("call, fragment", [
    (lambda: models.build_float_model("resnet"), "Known models: mlp, cnn"),
    (lambda: models.mlp(num_classes=1), "num_classes"),
    (lambda: models.mlp(hidden=(0,)), "hidden"),
    (lambda: models.small_cnn(input_shape=(784,)), "(height, width, channels)"),
])
def test_model_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call()


# -------------------------------------------------------------------------------- plots


def test_plots_are_valid_pngs(tmp_path):
    rows = [{"step": s, "epoch": 0, "m_coherence": 30.0 / (1 + s), "m_coherence/dense_1": 20.0 / (1 + s),
             "m_coherence/logits": float("nan"), "train_accuracy": s / 10} for s in range(10)]
    path = plots.plot_coherence(rows, str(tmp_path / "a" / "one.png"), title="t", per_layer=True)
    _assert_png(path)
    path = plots.plot_coherence_comparison(
        {"real": rows, "random": [dict(r, m_coherence=1.0 + r["step"]) for r in rows]},
        str(tmp_path / "cmp.png"), xscale="symlog", secondary_key="train_accuracy", smooth=3)
    _assert_png(path)


def test_plot_reads_monitor_csv(tiny_run, tmp_path):
    _, out = tiny_run
    rows = plots.read_history_csv(str(out / "coherence.csv"))
    assert isinstance(rows[0]["step"], int) and rows[0]["step"] == 0
    assert plots.layer_names(rows) == ["dense_1", "logits"]
    _assert_png(plots.plot_coherence(rows, str(tmp_path / "again.png"), xscale="log"))


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.plot_coherence([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="m_coherence"):
        plots.plot_coherence([{"step": 0}], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="xscale"):
        plots.plot_coherence([{"step": 0, "m_coherence": 1.0}], str(tmp_path / "x.png"), xscale="loglog")
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_coherence_comparison({}, str(tmp_path / "x.png"))


@pytest.mark.parametrize("module", [models, plots], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
