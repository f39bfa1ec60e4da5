"""``python -m edge`` on bad input and faults: every one ends in a one-line ``error:`` and a
non-zero exit (or, for an unusable newest checkpoint, a warning and a fallback), never a
crash, a traceback, or a run that exits 0 on wrong data.

Runs are subprocesses with ``tensorflow``, ``tf_keras`` and ``keras_coherence`` blocked (as
in tests/test_edge.py). Reference values come from LiteRT driven directly in the test
(``ai_edge_litert``) or from an uninterrupted run of the same seed.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras
from keras_coherence.binary import export_training, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from test_edge import BATCH, _task  # noqa: E402  (the same separable 3-class task)

N_TRAIN = 96


def _export(path, hidden):
    keras.utils.set_random_seed(1)
    bnn = models.mlp(input_shape=(12,), num_classes=3, hidden=(hidden,), method="low_memory")
    path.write_bytes(export_training.to_training_tflite(export_training.TrainingModule(bnn, learning_rate=1e-2)))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two models of the same layers but hidden width 16 and 8, data, and import blockers."""
    root = tmp_path_factory.mktemp("edge_faults")
    wide, narrow = _export(root / "wide.tflite", 16), _export(root / "narrow.tflite", 8)
    x, y = _task(N_TRAIN)
    np.savez(root / "train.npz", x=x, y=y)
    blockers = root / "blockers"
    for name in ("tensorflow", "tf_keras", "keras_coherence"):
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} is not allowed on the device side')\n")
    return {"root": root, "wide": wide, "narrow": narrow, "data": root / "train.npz", "x": x, "y": y,
            "env": dict(os.environ, PYTHONPATH=os.pathsep.join([str(blockers), REPO]))}


def _run(env, *args):
    return subprocess.run([sys.executable, "-m", "edge", *map(str, args)], env=env["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _ok(env, *args):
    proc = _run(env, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _fails(env, *args, fragments=()):
    """The run exits 2 with exactly one ``error:`` line naming every fragment, no traceback."""
    proc = _run(env, *args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert proc.stdout == ""
    return errors[0]


def _train(env, ckpt, epochs, *extra, model=None, data=None):
    return _ok(env, "train", model or env["wide"], "--data", data or env["data"], "--epochs", epochs,
               "--batch-size", BATCH, "--checkpoint-dir", ckpt, "--no-progress", *extra)


def _losses(path):
    rows = [line.split(",") for line in path.read_text().split()]
    return {(int(e), int(s)): float(v) for e, s, v in rows}


def _state(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _litert_state_shapes(model_path):
    """``{name: shape}`` of the state, read from the model's get_weights with LiteRT here."""
    from ai_edge_litert.interpreter import Interpreter

    weights = Interpreter(model_path=str(model_path)).get_signature_runner("get_weights")()
    return {k: tuple(v.shape) for k, v in weights.items()}


# ------------------------------------------------------------------ checkpoints of another model
def test_resume_refuses_a_checkpoint_of_another_width(env, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(env, ckpt, 1)
    wide, narrow = _litert_state_shapes(env["wide"]), _litert_state_shapes(env["narrow"])
    assert wide["fc_1_kernel"] != narrow["fc_1_kernel"]
    before = (ckpt / "epoch_0001.npz").read_bytes()
    error = _fails(env, "train", env["narrow"], "--data", env["data"], "--epochs", 2, "--batch-size", BATCH,
                   "--checkpoint-dir", ckpt, "--resume", "--no-progress",
                   fragments=["none of the 1 checkpoint(s)", "does not fit",
                              f"fc_1_kernel {wide['fc_1_kernel']} in the checkpoint vs {narrow['fc_1_kernel']} "
                              "in the model"])
    assert "another architecture or width" in error
    assert sorted(os.listdir(ckpt)) == ["epoch_0001.npz"] and (ckpt / "epoch_0001.npz").read_bytes() == before


def test_infer_refuses_weights_of_another_width(env, tmp_path):
    _train(env, tmp_path / "ckpt", 1)
    wide, narrow = _litert_state_shapes(env["wide"]), _litert_state_shapes(env["narrow"])
    _fails(env, "infer", env["narrow"], "--data", env["data"], "--weights", tmp_path / "ckpt" / "epoch_0001.npz",
           fragments=["epoch_0001.npz does not fit", str(env["narrow"]),
                      f"logits_kernel {wide['logits_kernel']} in the checkpoint vs {narrow['logits_kernel']}"])


def test_infer_refuses_weights_with_missing_extra_or_retyped_tensors(env, tmp_path):
    _train(env, tmp_path / "ckpt", 1)
    state = _state(tmp_path / "ckpt" / "epoch_0001.npz")
    missing = {k: v for k, v in state.items() if k != "adam_step"}
    extra = dict(state, surplus=np.zeros(2, np.float32))
    retyped = dict(state, fc_1_kernel=state["fc_1_kernel"].astype(np.float64))
    for name, weights, fragment in [("missing", missing, "it lacks adam_step"),
                                    ("extra", extra, "the model has no surplus"),
                                    ("retyped", retyped, "fc_1_kernel is float64, the model's is float32")]:
        np.savez(tmp_path / f"{name}.npz", **weights)
        _fails(env, "infer", env["wide"], "--data", env["data"], "--weights", tmp_path / f"{name}.npz",
               fragments=[fragment])


# ------------------------------------------------------------------ bad data
@pytest.mark.parametrize("fault, fragment", [
    ("label_too_large", "1 label(s) are >= 3 (the largest is 3)"),
    ("label_negative", "labels must lie in [0, classes); y holds values from -1"),
    ("float_labels", "y must be a vector of integer class labels (it is float64"),
    ("nan_pixel", "x holds NaN or inf in 1 example(s) (the first is example 7)"),
    ("inf_pixel", "x holds NaN or inf in 1 example(s) (the first is example 7)"),
    ("wrong_shape", "x holds examples of shape (10,) but"),
    ("integer_x", "x is uint8, not float"),
    ("length_mismatch", "96 inputs but 95 labels"),
    ("empty", "x has shape (0, 12); it needs at least one example"),
    ("no_y", "must hold arrays 'x' and 'y' (it has ['x'])"),
    ("no_x", "must hold arrays 'x' and 'y' (it has ['y'])"),
])
def test_bad_training_data_is_refused_before_training(env, tmp_path, fault, fragment):
    x, y = env["x"].copy(), env["y"].copy()
    arrays = {"x": x, "y": y}
    if fault == "label_too_large":
        y[5] = 3
    elif fault == "label_negative":
        y[5] = -1
    elif fault == "float_labels":
        arrays["y"] = y.astype(np.float64)
    elif fault == "nan_pixel":
        x[7, 3] = np.nan
    elif fault == "inf_pixel":
        x[7, 0] = np.inf
    elif fault == "wrong_shape":
        arrays["x"] = x[:, :10]
    elif fault == "integer_x":
        arrays["x"] = np.zeros(x.shape, np.uint8)
    elif fault == "length_mismatch":
        arrays["y"] = y[:-1]
    elif fault == "empty":
        arrays = {"x": x[:0], "y": y[:0]}
    elif fault == "no_y":
        del arrays["y"]
    elif fault == "no_x":
        del arrays["x"]
    np.savez(tmp_path / "bad.npz", **arrays)
    ckpt = tmp_path / "ckpt"
    _fails(env, "train", env["wide"], "--data", tmp_path / "bad.npz", "--batch-size", BATCH,
           "--checkpoint-dir", ckpt, fragments=[str(tmp_path / "bad.npz"), fragment])
    assert not ckpt.exists()


def test_infer_refuses_out_of_range_labels(env, tmp_path):
    y = env["y"].copy()
    y[0] = 7
    np.savez(tmp_path / "bad.npz", x=env["x"], y=y)
    _fails(env, "infer", env["wide"], "--data", tmp_path / "bad.npz", fragments=["labels must lie in [0, 3)"])


# ------------------------------------------------------------------ bad options
@pytest.mark.parametrize("options, fragment", [
    (["--batch-size", "-5"], "--batch-size must be an integer >= 1, got -5"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", str(N_TRAIN + 1)], f"--batch-size {N_TRAIN + 1} is larger than the {N_TRAIN} training"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--keep", "0"], "--keep must be an integer >= 1, got 0"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
])
def test_bad_train_options_write_nothing(env, tmp_path, options, fragment):
    args = {"--batch-size": str(BATCH), "--epochs": "1"}
    args.update(dict(zip(options[::2], options[1::2])))
    ckpt = tmp_path / "ckpt"
    _fails(env, "train", env["wide"], "--data", env["data"], "--checkpoint-dir", ckpt,
           *[v for item in args.items() for v in item], fragments=[fragment])
    assert not ckpt.exists()


def test_infer_refuses_a_non_positive_batch_size(env):
    _fails(env, "infer", env["wide"], "--data", env["data"], "--batch-size", 0,
           fragments=["--batch-size must be an integer >= 1, got 0"])


def test_fresh_run_refuses_a_used_checkpoint_dir(env, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(env, ckpt, 2)
    before = {p: (ckpt / p).read_bytes() for p in os.listdir(ckpt)}
    _fails(env, "train", env["wide"], "--data", env["data"], "--epochs", 1, "--batch-size", BATCH,
           "--checkpoint-dir", ckpt, fragments=["already holds checkpoints (epoch_0001.npz, epoch_0002.npz)",
                                                "--resume"])
    assert {p: (ckpt / p).read_bytes() for p in os.listdir(ckpt)} == before


# ------------------------------------------------------------------ damaged files
def _damaged(path, kind, source):
    data = source.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "flipped":
        flipped = bytearray(data)
        for i in range(len(data) // 4, len(data) * 3 // 4, 97):
            flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
    return path


@pytest.mark.parametrize("kind", ["truncated", "empty", "flipped", "npy", "missing"])
def test_damaged_data_file_gives_one_line_error(env, tmp_path, kind):
    bad = tmp_path / "bad.npz"
    if kind == "npy":
        bad = tmp_path / "bad.npy"
        np.save(bad, env["x"])
    elif kind != "missing":
        _damaged(bad, kind, env["data"])
    fragment = "does not exist" if kind == "missing" else "is not a readable .npz file"
    for command in ("train", "infer"):
        _fails(env, command, env["wide"], "--data", bad, "--batch-size", BATCH, fragments=[str(bad), fragment])


@pytest.mark.parametrize("kind", ["truncated", "empty", "flipped", "missing"])
def test_damaged_model_file_gives_one_line_error(env, tmp_path, kind):
    bad = tmp_path / "bad.tflite"
    if kind != "missing":
        _damaged(bad, kind, env["wide"])
    fragment = "does not exist" if kind == "missing" else "is not a valid TFLite model"
    for command in ("train", "infer"):
        _fails(env, command, bad, "--data", env["data"], "--batch-size", BATCH, fragments=[str(bad), fragment])


def test_damaged_weights_file_gives_one_line_error(env, tmp_path):
    _train(env, tmp_path / "ckpt", 1)
    bad = _damaged(tmp_path / "bad.npz", "truncated", tmp_path / "ckpt" / "epoch_0001.npz")
    _fails(env, "infer", env["wide"], "--data", env["data"], "--weights", bad,
           fragments=[str(bad), "is not a readable .npz file"])


# ------------------------------------------------------------------ resume falls back
@pytest.mark.parametrize("newest", ["truncated", "flipped", "other_width", "nan"])
def test_resume_skips_an_unusable_newest_checkpoint(env, tmp_path, newest):
    """The newest checkpoint is damaged or foreign: --resume warns, restarts from the one
    before, and then repeats an uninterrupted run's losses and final state exactly."""
    full_log, split_log = tmp_path / "full.csv", tmp_path / "split.csv"
    _train(env, tmp_path / "full", 3, "--loss-log", full_log)
    ckpt = tmp_path / "split"
    _train(env, ckpt, 2)
    last = ckpt / "epoch_0002.npz"
    if newest == "other_width":
        _train(env, tmp_path / "narrow", 2, model=env["narrow"])
        last.write_bytes((tmp_path / "narrow" / "epoch_0002.npz").read_bytes())
        reason = "does not fit"
    elif newest == "nan":
        state = _state(last)
        state["bn_fc_1_beta"][0] = np.nan
        np.savez(last, **state)
        reason = "NaN or inf in bn_fc_1_beta"
    else:
        _damaged(last, newest, tmp_path / "full" / "epoch_0002.npz")
        reason = "is not a readable .npz file"
    summary, stderr = _train(env, ckpt, 3, "--resume", "--loss-log", split_log)
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"skips {last}" in warnings[0] and reason in warnings[0], stderr
    assert summary["first_epoch"] == 2 and summary["resumed_from"] == str(ckpt / "epoch_0001.npz")
    full = _losses(full_log)
    assert _losses(split_log) == {k: v for k, v in full.items() if k[0] >= 2}
    _assert_same_state(_state(ckpt / "epoch_0003.npz"), _state(tmp_path / "full" / "epoch_0003.npz"))


def test_resume_removes_temporary_files_of_a_killed_write(env, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(env, ckpt, 1)
    # what a run killed while writing epoch 2 leaves: a partial temporary file
    stale = ckpt / ".epoch_0002.npz.12345.tmp"
    stale.write_bytes((ckpt / "epoch_0001.npz").read_bytes()[:100])
    summary, _ = _train(env, ckpt, 2, "--resume")
    assert summary["first_epoch"] == 2 and not stale.exists()
    assert sorted(os.listdir(ckpt)) == ["epoch_0001.npz", "epoch_0002.npz"]


# ------------------------------------------------------------------ divergence
def test_non_finite_loss_stops_without_a_checkpoint(env, tmp_path):
    """A state whose logits overflow (β of ±1e30, finite) gives a NaN loss on the first
    step: the run fails, the loss is logged, and no checkpoint of the diverged state is written.
    (With XNNPACK, ``--xnnpack``: LiteRT's builtin kernels, the default, round β through
    float16 to a finite value and keep this loss finite.)"""
    from edge.runner import open_interpreter

    ckpt = tmp_path / "ckpt"
    _train(env, ckpt, 1)
    state = _state(ckpt / "epoch_0001.npz")
    state["logits_bn_beta"] = np.array([-1e30, 1e30, 1e30], np.float32)
    np.savez(ckpt / "epoch_0001.npz", **state)
    before = (ckpt / "epoch_0001.npz").read_bytes()
    # LiteRT itself, given this state and the first batch of epoch 2, returns a non-finite loss
    interp = open_interpreter(str(env["wide"]), xnnpack=True)
    interp.get_signature_runner("set_weights")(**{k: v for k, v in state.items() if k != "__epoch__"})
    idx = np.random.default_rng([0, 2]).permutation(N_TRAIN)[:BATCH]
    assert not np.isfinite(interp.get_signature_runner("train")(x=env["x"][idx], y=env["y"][idx])["loss"])

    log = tmp_path / "losses.csv"
    _fails(env, "train", env["wide"], "--data", env["data"], "--epochs", 3, "--batch-size", BATCH,
           "--checkpoint-dir", ckpt, "--resume", "--no-progress", "--loss-log", log, "--xnnpack",
           fragments=["training diverged: the loss is nan at epoch 2 step 1",
                      f"the newest checkpoint is still {ckpt / 'epoch_0001.npz'}"])
    assert sorted(os.listdir(ckpt)) == ["epoch_0001.npz"] and (ckpt / "epoch_0001.npz").read_bytes() == before
    assert log.read_text().split() == ["2,1,nan"]


def test_non_finite_state_with_finite_losses_fails(env, tmp_path):
    """Inputs of 1e30 (finite) overflow the batch-norm moving statistics (float16-rounded
    batch statistics: inf with XNNPACK, ``--xnnpack``) while every loss stays finite: the
    run still fails and writes no checkpoint."""
    np.savez(tmp_path / "huge.npz", x=env["x"] * np.float32(1e30), y=env["y"])
    log = tmp_path / "losses.csv"
    _fails(env, "train", env["wide"], "--data", tmp_path / "huge.npz", "--batch-size", BATCH,
           "--checkpoint-dir", tmp_path / "ckpt", "--no-progress", "--loss-log", log, "--xnnpack",
           fragments=["training diverged: after epoch 1 the state holds NaN or inf in", "moving_"])
    assert all(np.isfinite(list(_losses(log).values())))
    assert not (tmp_path / "ckpt").exists() or os.listdir(tmp_path / "ckpt") == []
    # without a checkpoint directory the diverged state fails the run as well
    _fails(env, "train", env["wide"], "--data", tmp_path / "huge.npz", "--batch-size", BATCH, "--no-progress",
           "--xnnpack", fragments=["training diverged"])


# ------------------------------------------------------------------ --keep and atomic writes
def test_keep_leaves_the_newest_checkpoints(env, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(env, ckpt, 5, "--keep", 2)
    assert sorted(os.listdir(ckpt)) == ["epoch_0004.npz", "epoch_0005.npz"]
    _train(env, tmp_path / "all", 5, "--keep", 5)
    assert sorted(os.listdir(tmp_path / "all")) == [f"epoch_{e:04d}.npz" for e in range(1, 6)]
    # the kept files are the states after epochs 4 and 5, not just named so
    for epoch in (4, 5):
        _assert_same_state(_state(ckpt / f"epoch_{epoch:04d}.npz"), _state(tmp_path / "all" / f"epoch_{epoch:04d}.npz"))
    assert int(_state(ckpt / "epoch_0005.npz")["adam_step"]) == 5 * (N_TRAIN // BATCH)


def test_checkpoint_write_is_fsynced_then_renamed(env, tmp_path, monkeypatch):
    """The bytes reach the disk (fsync of the file) before the rename makes them the
    checkpoint, the rename is made durable (fsync of the directory), and a write that fails
    midway leaves the previous checkpoint and no temporary file."""
    from edge import runner

    model = runner.TrainingModel(str(env["wide"]))
    ckpt = tmp_path / "ckpt"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            events.append(("fsync", "<dir>" if os.path.samestat(st, os.stat(ckpt)) else "<other dir>"))
        else:  # the file's name, found by its inode
            events.append(("fsync", *[p for p in os.listdir(ckpt) if os.path.samestat(st, os.stat(ckpt / p))]))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
        real_replace(src, dst)

    monkeypatch.setattr(runner.os, "fsync", fsync)
    monkeypatch.setattr(runner.os, "replace", replace)
    path = runner.save_checkpoint(model, str(ckpt), 1)
    tmp = f".epoch_0001.npz.{os.getpid()}.tmp"
    assert events == [("fsync", tmp), ("replace", tmp, "epoch_0001.npz"), ("fsync", "<dir>")]
    expected = {k: np.array(v) for k, v in
                model.interpreter.get_signature_runner("get_weights")().items()}
    saved = _state(path)
    assert int(saved.pop("__epoch__")) == 1
    _assert_same_state(saved, expected)

    before = (ckpt / "epoch_0001.npz").read_bytes()

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(runner.np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        runner.save_checkpoint(model, str(ckpt), 2)
    assert sorted(os.listdir(ckpt)) == ["epoch_0001.npz"] and (ckpt / "epoch_0001.npz").read_bytes() == before


def test_kill_9_then_resume_repeats_the_uninterrupted_run(env, tmp_path):
    """SIGKILL a training run after it wrote checkpoints; every checkpoint left is complete,
    and --resume reaches the same state and losses as a run that was never interrupted."""
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "edge", "train", str(env["wide"]), "--data", str(env["data"]),
                             "--epochs", "100000", "--batch-size", str(BATCH), "--checkpoint-dir", str(ckpt),
                             "--no-progress", "--keep", "2"],
                            env=env["env"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A guard against a hung run only: alone it writes both checkpoints in a few
        # seconds, but under a loaded 2-core CI run it once took over 60 s.
        deadline = time.monotonic() + 300
        while not (ckpt / "epoch_0002.npz").exists():
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.005)
        time.sleep(0.05)  # into the middle of later epochs and checkpoint writes
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(int(p[6:10]) for p in os.listdir(ckpt) if p.startswith("epoch_"))
    for epoch in left:  # complete files: every array reads back, with its epoch
        assert int(_state(ckpt / f"epoch_{epoch:04d}.npz")["__epoch__"]) == epoch
    done = left[-1]
    target = done + 2
    resumed_log, full_log = tmp_path / "resumed.csv", tmp_path / "full.csv"
    summary, _ = _train(env, ckpt, target, "--resume", "--loss-log", resumed_log)
    assert summary["first_epoch"] == done + 1
    _train(env, tmp_path / "full", target, "--loss-log", full_log, "--keep", 1)
    assert _losses(resumed_log) == {k: v for k, v in _losses(full_log).items() if k[0] > done}
    _assert_same_state(_state(ckpt / f"epoch_{target:04d}.npz"), _state(tmp_path / "full" / f"epoch_{target:04d}.npz"))
