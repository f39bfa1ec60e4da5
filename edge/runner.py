"""Train and run an exported training model with LiteRT and numpy only.

The model file is what ``keras_coherence.binary.export_training.to_tflite`` writes:
a TFLite model with the signatures ``train(x, y) -> loss``, ``infer(x) -> logits``,
``get_weights() -> {name: array}`` and ``set_weights(**{name: array})``. Nothing here
imports TensorFlow or keras_coherence.
"""
import glob
import os
import re
import resource
import sys
import time

import numpy as np

SIGNATURES = ("train", "infer", "get_weights", "set_weights")
_CHECKPOINT = "epoch_{:04d}.npz"
_EPOCH_KEY = "__epoch__"


def peak_rss_mib():
    """Peak resident memory of this process so far (``ru_maxrss``; KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class TrainingModel:
    """A training model's four signatures in one LiteRT interpreter.

    Args:
        path: the ``.tflite`` file.
        num_threads: interpreter threads (None: LiteRT's default).
    """

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = path
        self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        found = self.interpreter.get_signature_list()
        missing = [s for s in SIGNATURES if s not in found]
        if missing:
            raise ValueError(
                f"{path} lacks the signature(s) {missing} (it has {sorted(found)}); export it with "
                "keras_coherence.binary.export_training.to_tflite"
            )
        self._runners = {s: self.interpreter.get_signature_runner(s) for s in SIGNATURES}
        self.weight_names = list(found["set_weights"]["inputs"])
        inputs = self._runners["train"].get_input_details()
        self.x_dtype = inputs["x"]["dtype"]
        self.y_dtype = inputs["y"]["dtype"]
        batch = int(inputs["x"]["shape_signature"][0])
        #: the batch size ``train`` was exported for (models with convolutions), or None for any
        self.train_batch_size = batch if batch > 0 else None

    def train_step(self, x, y):
        """One training step; returns the batch loss (float)."""
        out = self._runners["train"](x=np.asarray(x, self.x_dtype), y=np.asarray(y, self.y_dtype))
        return float(out["loss"])

    def infer(self, x):
        """Logits of ``x`` (the moving batch-norm statistics are used)."""
        return np.array(self._runners["infer"](x=np.asarray(x, self.x_dtype))["logits"])

    def get_weights(self):
        """The whole training state, ``{name: np.ndarray}`` (copies)."""
        return {k: np.array(v) for k, v in self._runners["get_weights"]().items()}

    def set_weights(self, weights):
        """Writes a full state (every name of ``weight_names``) into the model."""
        missing = [n for n in self.weight_names if n not in weights]
        if missing:
            raise ValueError(f"the weights lack {missing}")
        self._runners["set_weights"](**{n: np.asarray(weights[n], np.float32) for n in self.weight_names})


def load_data(path, need_labels=True):
    """``(x, y)`` from an ``.npz`` with arrays ``x`` (float) and ``y`` (int labels; may be
    absent when ``need_labels`` is False, then ``y`` is None)."""
    with np.load(path) as data:
        if "x" not in data or (need_labels and "y" not in data):
            raise ValueError(f"{path} must hold arrays 'x' and 'y' (it has {sorted(data.files)})")
        x = np.asarray(data["x"], np.float32)
        y = np.asarray(data["y"]).astype(np.int32) if "y" in data else None
    if y is not None and len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} inputs but {len(y)} labels")
    return x, y


def epoch_batches(n, batch_size, seed, epoch):
    """Index arrays of one epoch's full batches: a permutation fixed by ``(seed, epoch)``
    (so a resumed run sees the same batches), the last partial batch dropped."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training examples")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


class ProgressBar:
    """A plain-text progress bar on ``stream``: ``\\r``-updated on a terminal, one line
    per epoch otherwise (logs stay readable)."""

    def __init__(self, total, label, stream=None, width=30):
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()

    def update(self, done, loss):
        if done != self.total and not self.stream.isatty():
            return
        filled = int(self.width * done / self.total)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{done}/{self.total} loss {loss:.4f} {elapsed:.1f}s")
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def latest_checkpoint(checkpoint_dir):
    """``(epoch, path)`` of the newest ``epoch_NNNN.npz`` in ``checkpoint_dir``, or None."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir, "epoch_*.npz")):
        match = re.fullmatch(r"epoch_(\d+)\.npz", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def save_checkpoint(model, checkpoint_dir, epoch):
    """Writes the model's state after ``epoch`` (1-based) to ``checkpoint_dir`` atomically."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, _CHECKPOINT.format(epoch))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **model.get_weights(), **{_EPOCH_KEY: np.int64(epoch)})
    os.replace(tmp, path)
    return path


def load_checkpoint(model, path):
    """Sets the model's state from a checkpoint; returns the epoch it was written after."""
    with np.load(path) as data:
        model.set_weights({k: data[k] for k in data.files if k != _EPOCH_KEY})
        return int(data[_EPOCH_KEY])


def train(model_path, data_path, epochs, batch_size, checkpoint_dir=None, resume=False, seed=0,
          loss_log=None, num_threads=None, progress=True):
    """Trains for ``epochs`` epochs in total (a resumed run continues after its checkpoint).

    Checkpoints go to ``checkpoint_dir`` after every epoch; ``resume`` restarts from
    the newest one there. ``loss_log`` (a path) gets one ``epoch,step,loss`` line per
    step (appended). Returns a summary dict: losses, median step time, wall time, and
    peak RSS (``ru_maxrss``) after loading the model and data (``setup_peak_rss_mib``)
    and at the end (``peak_rss_mib``).
    """
    start = time.perf_counter()
    model = TrainingModel(model_path, num_threads)
    x, y = load_data(data_path)
    if model.train_batch_size not in (None, batch_size):
        raise ValueError(f"{model_path} trains on batches of {model.train_batch_size} (fixed at export); "
                         f"use --batch-size {model.train_batch_size}")
    first_epoch = 1
    if resume:
        if checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise ValueError(f"--resume: no epoch_*.npz checkpoint in {checkpoint_dir}")
        first_epoch = load_checkpoint(model, found[1]) + 1
    log = open(loss_log, "a") if loss_log else None
    epoch_losses, step_times = [], []
    setup_rss = peak_rss_mib()
    try:
        for epoch in range(first_epoch, epochs + 1):
            batches = epoch_batches(len(x), batch_size, seed, epoch)
            bar = ProgressBar(len(batches), f"epoch {epoch}/{epochs}") if progress else None
            losses = []
            for step, idx in enumerate(batches, 1):
                t0 = time.perf_counter()
                loss = model.train_step(x[idx], y[idx])
                step_times.append(time.perf_counter() - t0)
                losses.append(loss)
                if log:
                    log.write(f"{epoch},{step},{loss!r}\n")
                if bar:
                    bar.update(step, float(np.mean(losses)))
            epoch_losses.append(float(np.mean(losses)))
            if checkpoint_dir is not None:
                save_checkpoint(model, checkpoint_dir, epoch)
    finally:
        if log:
            log.close()
    return {
        "command": "train",
        "first_epoch": first_epoch,
        "epochs": epochs,
        "steps": len(step_times),
        "batch_size": batch_size,
        "epoch_losses": epoch_losses,
        "median_step_ms": float(np.median(step_times) * 1e3) if step_times else None,
        "wall_s": time.perf_counter() - start,
        "setup_peak_rss_mib": setup_rss,
        "peak_rss_mib": peak_rss_mib(),
    }


def infer(model_path, data_path, batch_size=256, weights=None, num_threads=None):
    """Logits for every input of ``data_path``; accuracy when it has labels.

    ``weights``: optional checkpoint ``.npz`` loaded first. Returns ``(summary dict, logits)``.
    """
    start = time.perf_counter()
    model = TrainingModel(model_path, num_threads)
    if weights is not None:
        load_checkpoint(model, weights)
    x, y = load_data(data_path, need_labels=False)
    logits = np.concatenate([model.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    summary = {"command": "infer", "examples": len(x)}
    if y is not None:
        summary["accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == y))
    summary.update(wall_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib())
    return summary, logits
