"""``python -m edge``: trains and infers with LiteRT + numpy alone.

Each run is a subprocess whose PYTHONPATH starts with a directory holding stand-in
``tensorflow``, ``tf_keras`` and ``keras_coherence`` packages that raise ImportError,
so any import of them by the device side fails the run.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras
from keras_coherence.binary import export_training, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16


def _task(n, seed=0, dim=12, classes=3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, (classes, dim))
    y = rng.integers(0, classes, n).astype(np.int32)
    x = (centers[y] + rng.normal(0.0, 1.0, (n, dim))).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    keras.utils.set_random_seed(1)
    bnn = models.mlp(input_shape=(12,), num_classes=3, hidden=(16,), method="low_memory")
    model = root / "model.tflite"
    model.write_bytes(export_training.to_training_tflite(export_training.TrainingModule(bnn, learning_rate=1e-2)))
    x, y = _task(146)
    np.savez(root / "train.npz", x=x[:96], y=y[:96])
    np.savez(root / "test.npz", x=x[96:], y=y[96:])
    blockers = root / "blockers"
    for name in ("tensorflow", "tf_keras", "keras_coherence"):
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} is not allowed on the device side')\n")
    return root, model, blockers


def _edge(blockers, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blockers), REPO]))
    proc = subprocess.run([sys.executable, "-m", "edge", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _losses(path):
    rows = [line.split(",") for line in path.read_text().split()]
    return {(int(e), int(s)): float(v) for e, s, v in rows}


def test_blockers_block(files):
    root, _, blockers = files
    env = dict(os.environ, PYTHONPATH=str(blockers))
    proc = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "not allowed on the device side" in proc.stderr


def test_train_resume_and_infer(files):
    root, model, blockers = files
    full_log, split_log = root / "full.csv", root / "split.csv"
    summary, stderr = _edge(blockers, "train", model, "--data", root / "train.npz", "--epochs", 3,
                            "--batch-size", BATCH, "--checkpoint-dir", root / "full", "--loss-log", full_log)
    assert "epoch 3/3 [" in stderr and summary["steps"] == 3 * (96 // BATCH)
    assert summary["peak_rss_mib"] >= summary["setup_peak_rss_mib"] > 0 and summary["wall_s"] > 0
    full = _losses(full_log)
    first, last = np.mean([full[1, s] for s in range(1, 4)]), np.mean([full[3, s] for s in range(4, 7)])
    assert last < first, (first, last)

    # two epochs, then resume to three: epoch 3 repeats the uninterrupted run's losses exactly
    _edge(blockers, "train", model, "--data", root / "train.npz", "--epochs", 2, "--batch-size", BATCH,
          "--checkpoint-dir", root / "split", "--loss-log", split_log, "--no-progress")
    resumed, _ = _edge(blockers, "train", model, "--data", root / "train.npz", "--epochs", 3,
                       "--batch-size", BATCH, "--checkpoint-dir", root / "split", "--resume",
                       "--loss-log", split_log, "--no-progress")
    assert resumed["first_epoch"] == 3 and resumed["resumed_from"] == str(root / "split" / "epoch_0002.npz")
    assert _losses(split_log) == full
    with np.load(root / "split" / "epoch_0003.npz") as split, np.load(root / "full" / "epoch_0003.npz") as whole:
        assert sorted(split.files) == sorted(whole.files)
        for name in whole.files:
            np.testing.assert_array_equal(split[name], whole[name], err_msg=name)

    # infer with the trained weights: its accuracy is numpy's argmax over LiteRT outputs computed here
    ckpt = root / "full" / "epoch_0003.npz"
    out = root / "logits.npz"
    summary, _ = _edge(blockers, "infer", model, "--data", root / "test.npz", "--weights", ckpt, "--out", out)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model))
    with np.load(ckpt) as w:
        interp.get_signature_runner("set_weights")(**{k: w[k] for k in w.files if k != "__epoch__"})
    with np.load(root / "test.npz") as d:
        logits = interp.get_signature_runner("infer")(x=d["x"])["logits"]
        accuracy = float(np.mean(np.argmax(logits, -1) == d["y"]))
    assert summary["accuracy"] == accuracy and summary["examples"] == 50
    with np.load(out) as saved:
        np.testing.assert_allclose(saved["logits"], logits, rtol=1e-6, atol=1e-6)
    assert summary["accuracy"] > 0.5


def test_clear_errors(files):
    root, model, blockers = files
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blockers), REPO]))
    proc = subprocess.run([sys.executable, "-m", "edge", "train", str(model), "--data", str(root / "train.npz"),
                           "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--resume needs --checkpoint-dir" in proc.stderr


def test_fixed_batch_model_names_its_batch_size(files, tmp_path):
    root, _, blockers = files
    keras.utils.set_random_seed(2)
    bnn = models.mlp(input_shape=(12,), num_classes=3, hidden=(8,), method="low_memory")
    fixed = tmp_path / "fixed.tflite"
    fixed.write_bytes(export_training.to_training_tflite(export_training.TrainingModule(bnn, batch_size=8)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blockers), REPO]))
    proc = subprocess.run([sys.executable, "-m", "edge", "train", str(fixed), "--data", str(root / "train.npz"),
                           "--batch-size", "16"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "use --batch-size 8" in proc.stderr
    summary, _ = _edge(blockers, "train", fixed, "--data", root / "train.npz", "--batch-size", 8, "--no-progress")
    assert summary["steps"] == 96 // 8
