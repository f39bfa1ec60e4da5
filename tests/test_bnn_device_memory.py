"""benchmarks/bnn_device_memory.py's measuring subprocess and ``python -m edge train``'s
interpreter memory, on a tiny low-memory MLP training model.

The per-tensor bytes are checked against the LiteRT interpreter's own tensor details
(numpy over their shapes and dtypes), the state against ``get_weights``' arrays and the
losses against the same batch trained in this process; the subprocess runs with stand-in
``tensorflow`` / ``tf_keras`` / ``keras_coherence`` packages that raise on import.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from edge.runner import open_interpreter

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras
from keras_coherence.binary import export_training, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bnn_device_memory as bdm  # noqa: E402

BATCH = 8
HIDDEN = 256  # the 64x256 first kernel and its two Adam moments: a state of ~0.3 MB


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_memory")
    keras.utils.set_random_seed(3)
    model = models.mlp(input_shape=(64,), num_classes=4, hidden=(HIDDEN,), method="low_memory")
    path = root / "train.tflite"
    path.write_bytes(export_training.to_training_tflite(export_training.TrainingModule(model, batch_size=BATCH)))
    blockers = root / "blockers"
    for name in ("tensorflow", "tf_keras", "keras_coherence"):
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} is not allowed on the device side')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blockers), REPO]))
    return path, env


@pytest.fixture(scope="module")
def measured(files):
    path, env = files
    return bdm.run_child(str(path), BATCH, steps=3, env=env, timeout=120)


def test_child_imports_neither_tensorflow_nor_keras_coherence(measured):
    # the stand-in packages would have failed the subprocess on import; the flags say so too
    assert measured["imported_tensorflow"] is False
    assert measured["imported_keras_coherence"] is False


def test_tensor_bytes_equal_the_interpreters_shapes(files, measured):
    path, _ = files
    interpreter = open_interpreter(str(path))
    runner = interpreter.get_signature_runner("train")
    runner(x=np.zeros((BATCH, 64), np.float32), y=np.zeros(BATCH, np.int32))
    details = interpreter.get_tensor_details(runner._subgraph_index)
    reference = {}
    for d in details:
        if np.dtype(d["dtype"]) == np.object_:  # resource handles hold no data
            continue
        size = 1
        for n in d["shape"]:
            size *= int(n)
        reference[int(d["index"])] = size * np.dtype(d["dtype"]).itemsize
    tensors = {t["index"]: t for t in measured["tensors"]}
    assert len(tensors) == len(details)
    data_tensors = {i: t for i, t in tensors.items() if t["kind"] != "resource_handle"}
    assert set(data_tensors) == set(reference)
    for i, t in data_tensors.items():
        assert t["bytes"] == reference[i], (t["name"], t["shape"])
    # totals by kind: the summary's MiB equal the reference bytes summed over each kind
    totals = bdm.summarize(measured)["totals_mib"]
    for kind in bdm.KINDS:
        expected = sum(reference[i] for i, t in data_tensors.items() if t["kind"] == kind)
        assert totals[kind] * 2 ** 20 == pytest.approx(expected, abs=0.5), kind
    # every kind the classification promises occurs in a training graph
    for kind in ("variable_read", "saved_for_backward", "backward_weight_shaped", "backward_other"):
        assert totals[kind] > 0, kind
    # the arena replay: its peak holds at least the largest non-constant tensor, at most all of them
    nonconstant = [reference[i] for i, t in data_tensors.items() if t["kind"] != "constant"]
    assert max(nonconstant) <= measured["arena"]["live_peak_bytes"] <= sum(nonconstant)


def test_state_and_losses_equal_an_in_process_run(files, measured):
    path, _ = files
    interpreter = open_interpreter(str(path))
    state = interpreter.get_signature_runner("get_weights")()
    assert measured["state_bytes"] == sum(np.asarray(v).nbytes for v in state.values())
    # the child trains on default_rng(0): x uniform in [-1, 1], y integers in [0, classes)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(BATCH, 64)).astype(np.float32)
    y = rng.integers(0, 4, size=BATCH).astype(np.int32)
    train = interpreter.get_signature_runner("train")
    losses = [float(train(x=x, y=y)["loss"]) for _ in range(3)]
    np.testing.assert_allclose(measured["losses"], losses, rtol=1e-6)
    assert measured["data_bytes"] == x.nbytes + y.nbytes


def test_memory_phases_hold_the_state(measured):
    # after training the resource variables (state) are resident: the interpreter's
    # peak over the baseline is at least their bytes; the phases are consistent
    state_mib = measured["state_bytes"] / 2 ** 20
    assert measured["interpreter_peak_mib"] >= state_mib
    assert measured["interpreter_peak_mib"] == pytest.approx(
        (max(measured["load_hwm_kib"], measured["train_hwm_kib"]) - measured["baseline_rss_kib"]) / 1024)
    assert measured["step_ms"] > 0 and len(measured["losses"]) == 3


def test_edge_train_prints_interpreter_memory(files, tmp_path):
    path, env = files
    rng = np.random.default_rng(1)
    data = tmp_path / "train.npz"
    np.savez(data, x=rng.uniform(-1, 1, (4 * BATCH, 64)).astype(np.float32),
             y=rng.integers(0, 4, 4 * BATCH).astype(np.int32))
    proc = subprocess.run([sys.executable, "-m", "edge", "train", str(path), "--data", str(data),
                           "--batch-size", str(BATCH), "--epochs", "2"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    state_mib = sum(np.asarray(v).nbytes for v in
                    open_interpreter(str(path)).get_signature_runner("get_weights")().values()) / 2 ** 20
    # the state is resident after training; the interpreter's part is below the whole process
    assert state_mib <= summary["interpreter_peak_mib"] < summary["peak_rss_mib"]
    lines = re.findall(r"epoch (\d)/2 .* ([0-9.]+) ms/step interpreter ([0-9.]+) MiB", proc.stderr)
    assert [line[0] for line in lines] == ["1", "2"], proc.stderr
    # the last progress line's memory is at most the summary's (a peak only grows)
    assert float(lines[-1][2]) <= summary["interpreter_peak_mib"] + 0.05
