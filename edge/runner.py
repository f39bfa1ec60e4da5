"""Train and run an exported training model with LiteRT and numpy only.

The model file is what ``keras_coherence.binary.export_training.to_training_tflite`` writes:
a TFLite model with the signatures ``train(x, y) -> loss``, ``infer(x) -> logits``,
``get_weights() -> {name: array}`` and ``set_weights(**{name: array})``. Nothing here
imports TensorFlow or keras_coherence.

Everything read from disk is checked before LiteRT sees it: LiteRT does not check that a
``set_weights`` array has its variable's shape (a checkpoint of another model crashes the
process) nor that labels lie in ``[0, classes)`` (out-of-range labels train on a zero
loss), so bad input is refused here with a ``ValueError`` naming what is wrong.
"""
import glob
import os
import re
import resource
import sys
import time
import zipfile
import zlib

import numpy as np

SIGNATURES = ("train", "infer", "get_weights", "set_weights")
_CHECKPOINT = "epoch_{:04d}.npz"
_CHECKPOINT_RE = re.compile(r"epoch_(\d+)\.npz")
_TEMP_RE = re.compile(r"\.epoch_\d+\.npz\.\d+\.tmp")
_EPOCH_KEY = "__epoch__"
#: what np.load / reading an array of an .npz raises for a damaged or non-.npz file
_NPZ_ERRORS = (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile, zlib.error)


def peak_rss_mib():
    """Peak resident memory of this process so far (``ru_maxrss``; KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def status_kib(field, required=False):
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux
    (``required=True``: RuntimeError instead, for measurements that must not go blank)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    if required:
        raise RuntimeError(f"{field} is not in /proc/self/status (Linux only)")
    return None


def reset_peak_rss(required=False):
    """Resets ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0);
    False where that is not possible (then ``VmHWM`` keeps the peak since the process start;
    ``required=True``: RuntimeError instead)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        if required:
            raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs)") from None
        return False


class InterpreterMemory:
    """The peak memory the interpreter adds: peak RSS growth from just before the model is
    loaded (the Python runtime, numpy and LiteRT already imported) to now, less the bytes
    of the data arrays the process holds. ``mib()`` is None off Linux, or where the peak
    mark cannot be reset (``/proc/self/clear_refs``): a peak from before the model load
    (e.g. imports) would then be counted."""

    def __init__(self):
        import ai_edge_litert.interpreter  # noqa: F401  (the runtime belongs to the baseline)

        self.baseline_kib = status_kib("VmRSS")
        self.valid = self.baseline_kib is not None and reset_peak_rss()
        self.data_bytes = 0

    def mib(self):
        peak = status_kib("VmHWM") if self.valid else None
        if peak is None:
            return None
        return (peak - self.baseline_kib) / 1024.0 - self.data_bytes / 2.0 ** 20


def _check_positive(name, value):
    """ValueError unless ``value`` is an integer >= 1 (``name`` is the option, e.g. ``--epochs``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _listed(items, limit=4):
    """``a, b, c and 2 more``: a bounded list for one-line messages."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _read_npz(path, keys=None):
    """``{key: array}`` of an ``.npz`` (only ``keys`` when given and present), read eagerly
    so that a damaged member fails here, as a ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (or is not a file)")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive of named arrays")
        with data:
            names = data.files if keys is None else [k for k in keys if k in data.files]
            return {k: data[k] for k in names}, list(data.files)
    except _NPZ_ERRORS as err:
        raise ValueError(f"{path} is not a readable .npz file ({type(err).__name__}: {err}); "
                         "it may be truncated or damaged: write it again") from err


def open_interpreter(path, num_threads=None, xnnpack=False):
    """A LiteRT ``Interpreter`` for ``path``; without the default XNNPACK delegate unless
    ``xnnpack``. A training graph's filters are tensors, not constants, so XNNPACK takes
    only parts of it and keeps its own buffers for them beside LiteRT's arena: measured
    on the low-memory CNV at batch 100, 191 MiB with it vs 110 MiB without, at about the
    same step time (3.1 vs 3.5 s)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    options = {} if xnnpack else {
        "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    return Interpreter(model_path=path, num_threads=num_threads, **options)


class TrainingModel:
    """A training model's four signatures in one LiteRT interpreter.

    Args:
        path: the ``.tflite`` file.
        num_threads: interpreter threads (None: LiteRT's default).
        xnnpack: use LiteRT's default XNNPACK delegate (see :func:`open_interpreter`).

    Raises:
        ValueError: the file is missing, not a valid TFLite model (truncated, damaged),
            lacks one of the four signatures, or its ``get_weights`` outputs differ from
            its ``set_weights`` inputs.
    """

    def __init__(self, path, num_threads=None, xnnpack=False):
        if num_threads is not None:
            _check_positive("--threads", num_threads)
        if not os.path.isfile(path):
            raise ValueError(f"the model {path} does not exist (or is not a file)")
        self.path = path
        try:
            self.interpreter = open_interpreter(path, num_threads, xnnpack)
        except ValueError as err:  # LiteRT's flatbuffer verifier: truncated, damaged, empty, not TFLite
            message = " ".join(str(err).split())
            raise ValueError(f"{path} is not a valid TFLite model (LiteRT: {message}); it may be truncated "
                             "or damaged: export it again") from err
        found = self.interpreter.get_signature_list()
        missing = [s for s in SIGNATURES if s not in found]
        if missing:
            raise ValueError(
                f"{path} lacks the signature(s) {missing} (it has {sorted(found)}); export it with "
                "keras_coherence.binary.export_training.to_training_tflite"
            )
        self._runners = {s: self.interpreter.get_signature_runner(s) for s in SIGNATURES}
        self.weight_names = list(found["set_weights"]["inputs"])
        #: ``{name: (shape, dtype)}`` of every state tensor, from ``set_weights``' inputs
        self.weight_spec = {n: (tuple(int(d) for d in v["shape_signature"]), np.dtype(v["dtype"]))
                            for n, v in self._runners["set_weights"].get_input_details().items()}
        outputs = {n: (tuple(int(d) for d in v["shape_signature"]), np.dtype(v["dtype"]))
                   for n, v in self._runners["get_weights"].get_output_details().items()}
        if outputs != self.weight_spec:
            raise ValueError(f"{path}: get_weights returns other tensors than set_weights takes; "
                             "export it again with keras_coherence.binary.export_training.to_training_tflite")
        inputs = self._runners["train"].get_input_details()
        self.x_dtype = inputs["x"]["dtype"]
        self.y_dtype = inputs["y"]["dtype"]
        batch = int(inputs["x"]["shape_signature"][0])
        #: the batch size ``train`` was exported for (models with convolutions), or None for any
        self.train_batch_size = batch if batch > 0 else None
        infer_in = self._runners["infer"].get_input_details()["x"]["shape_signature"]
        #: the shape of one example (``x.shape[1:]``)
        self.input_shape = tuple(int(d) for d in infer_in[1:])
        #: the number of classes (the logits' last dimension); labels lie in ``[0, num_classes)``
        self.num_classes = int(self._runners["infer"].get_output_details()["logits"]["shape_signature"][-1])

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

    def check_weights(self, weights, source="the weights"):
        """Raises ValueError unless ``weights`` holds exactly the model's state tensors, each
        with the model's shape and dtype and finite; ``source`` names them in the message."""
        problems = []
        missing = [n for n in self.weight_spec if n not in weights]
        extra = sorted(n for n in weights if n not in self.weight_spec)
        if missing:
            problems.append(f"it lacks {_listed(missing)}")
        if extra:
            problems.append(f"the model has no {_listed(extra)}")
        shapes, dtypes, nonfinite = [], [], []
        for name, (shape, dtype) in self.weight_spec.items():
            if name not in weights:
                continue
            value = np.asarray(weights[name])
            if value.shape != shape:
                shapes.append(f"{name} {value.shape} in the checkpoint vs {shape} in the model")
            elif value.dtype != dtype:
                dtypes.append(f"{name} is {value.dtype}, the model's is {dtype}")
            elif not np.all(np.isfinite(value)):
                nonfinite.append(name)
        if shapes:
            problems.append(f"shapes differ: {_listed(shapes)}")
        if dtypes:
            problems.append(f"dtypes differ: {_listed(dtypes)}")
        if nonfinite:
            problems.append(f"NaN or inf in {_listed(nonfinite)}")
        if problems:
            hint = (" (written by a model of another architecture or width?)" if missing or extra or shapes
                    else "")
            raise ValueError(f"{source} does not fit {self.path}: {'; '.join(problems)}{hint}")

    def set_weights(self, weights, source="the weights"):
        """Writes a full state (every name of ``weight_names``) into the model, after
        :meth:`check_weights` (LiteRT itself would crash on a wrong shape)."""
        self.check_weights(weights, source)
        self._runners["set_weights"](**{n: np.asarray(weights[n]) for n in self.weight_names})

    def check_data(self, x, y, source="the data"):
        """Raises ValueError unless the examples of ``x`` have the model's input shape and
        the labels ``y`` (may be None) lie in ``[0, num_classes)``."""
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"{source}: x holds examples of shape {x.shape[1:]} but {self.path} takes "
                             f"{self.input_shape}; export the data for this model")
        if y is not None and len(y) and int(y.max()) >= self.num_classes:
            bad = int(np.count_nonzero(y >= self.num_classes))
            raise ValueError(f"{source}: {bad} label(s) are >= {self.num_classes} (the largest is {int(y.max())}) "
                             f"but {self.path} has {self.num_classes} classes; labels must lie in "
                             f"[0, {self.num_classes})")


def load_data(path, need_labels=True):
    """``(x, y)`` from an ``.npz`` with arrays ``x`` (float, one example per row) and ``y``
    (integer labels >= 0; may be absent when ``need_labels`` is False, then ``y`` is None).

    Raises:
        ValueError: the file is unreadable, lacks ``x`` (or ``y``), ``x`` is empty, not float
            or holds NaN/inf, ``y`` is not a vector of non-negative integers of ``x``'s length.
    """
    arrays, names = _read_npz(path, ("x", "y"))
    if "x" not in arrays or (need_labels and "y" not in arrays):
        raise ValueError(f"{path} must hold arrays 'x' and 'y' (it has {sorted(names)})")
    x = arrays["x"]
    if x.dtype.kind != "f":
        raise ValueError(f"{path}: x is {x.dtype}, not float; scale the inputs to float as the export does "
                         "(float32 in [-1, 1])")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{path}: x has shape {x.shape}; it needs at least one example (shape (n, ...))")
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{path}: x holds NaN or inf in {len(bad)} example(s) (the first is example {bad[0]}); "
                         "remove or repair them")
    x = x.astype(np.float32, copy=False)
    y = arrays.get("y")
    if y is not None:
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise ValueError(f"{path}: y must be a vector of integer class labels (it is {y.dtype} of shape "
                             f"{y.shape}); save it with y.astype(np.int32)")
        if len(y) != len(x):
            raise ValueError(f"{path}: {len(x)} inputs but {len(y)} labels")
        if int(y.min()) < 0 or int(y.max()) > np.iinfo(np.int32).max:
            raise ValueError(f"{path}: labels must lie in [0, classes); y holds values from {int(y.min())} "
                             f"to {int(y.max())}")
        y = y.astype(np.int32)
    return x, y


def epoch_batches(n, batch_size, seed, epoch):
    """Index arrays of one epoch's full batches: a permutation fixed by ``(seed, epoch)``
    (so a resumed run sees the same batches), the last partial batch dropped."""
    _check_positive("the batch size", batch_size)
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

    def update(self, done, loss, step_ms=None, memory_mib=None):
        """``step_ms``: the median step time so far; ``memory_mib``: the interpreter's peak
        memory so far (:class:`InterpreterMemory`); each shown when given."""
        if done != self.total and not self.stream.isatty():
            return
        filled = int(self.width * done / self.total)
        elapsed = time.perf_counter() - self.start
        extra = "" if step_ms is None else f" {step_ms:.1f} ms/step"
        extra += "" if memory_mib is None else f" interpreter {memory_mib:.1f} MiB"
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{done}/{self.total} loss {loss:.4f} {elapsed:.1f}s{extra}")
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def checkpoints(checkpoint_dir):
    """``[(epoch, path), ...]`` of the ``epoch_NNNN.npz`` files in ``checkpoint_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "epoch_*.npz")):
        match = _CHECKPOINT_RE.fullmatch(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir):
    """``(epoch, path)`` of the newest ``epoch_NNNN.npz`` in ``checkpoint_dir``, or None."""
    found = checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _fsync_dir(directory):
    """Makes a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finite_state(model, epoch):
    """The model's state (``get_weights``) after ``epoch``; ValueError when it holds NaN or inf."""
    state = model.get_weights()
    nonfinite = [n for n, v in state.items() if not np.all(np.isfinite(v))]
    if nonfinite:
        raise ValueError(f"training diverged: after epoch {epoch} the state holds NaN or inf in "
                         f"{_listed(nonfinite)}; no checkpoint of it is written; lower the learning rate "
                         "(export) or check the scale of the data")
    return state


def save_checkpoint(model, checkpoint_dir, epoch, keep=None):
    """Writes the model's state after ``epoch`` (1-based) to ``checkpoint_dir/epoch_NNNN.npz``.

    Atomic: the state goes to a temporary file in the same directory, is fsync'ed and
    then renamed over the final name (``os.replace``), so a crash leaves either the
    previous file or the complete new one. ``keep``: afterwards, delete all but the newest
    ``keep`` checkpoints older than this one (None: keep all). Refuses (ValueError) a state
    holding NaN or inf, so a diverged run never overwrites a usable checkpoint.
    """
    state = finite_state(model, epoch)
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = _CHECKPOINT.format(epoch)
    path = os.path.join(checkpoint_dir, name)
    # a dot name that the epoch_*.npz glob never matches, unique to this process
    tmp = os.path.join(checkpoint_dir, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **state, **{_EPOCH_KEY: np.int64(epoch)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(checkpoint_dir)
    if keep is not None:
        older = [p for e, p in checkpoints(checkpoint_dir) if e < epoch]
        for old in older[:max(len(older) - (keep - 1), 0)]:
            os.unlink(old)
    return path


def remove_stale_temporaries(checkpoint_dir):
    """Deletes the temporary files of checkpoint writes a killed run left in ``checkpoint_dir``."""
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), ".epoch_*.tmp")):
        if _TEMP_RE.fullmatch(os.path.basename(path)):
            try:
                os.unlink(path)
            except OSError:
                pass


def load_checkpoint(model, path, require_epoch=True):
    """Sets the model's state from a checkpoint; returns the epoch it was written after
    (None when it has no epoch and ``require_epoch`` is False).

    Every array is checked (names, shapes, dtypes, finite) before the model is touched,
    so a ValueError leaves the model's state as it was.
    """
    arrays, _ = _read_npz(path)
    epoch = arrays.pop(_EPOCH_KEY, None)
    if epoch is not None:
        if epoch.shape != () or epoch.dtype.kind not in "iu" or int(epoch) < 1:
            raise ValueError(f"{path}: its {_EPOCH_KEY} is {epoch!r}, not a positive integer")
        epoch = int(epoch)
    elif require_epoch:
        raise ValueError(f"{path} has no {_EPOCH_KEY} entry; it is not a checkpoint of python -m edge train")
    model.set_weights(arrays, source=path)
    return epoch


def resume_latest(model, checkpoint_dir, stream=None):
    """Loads the newest usable checkpoint of ``checkpoint_dir`` into the model; returns
    ``(epoch, path)``. A newer checkpoint that is unreadable (truncated, damaged) or does
    not fit the model is skipped with a ``warning:`` line on ``stream`` (stderr).

    Raises:
        ValueError: there is no checkpoint, or none is usable (the message gives each reason).
    """
    stream = sys.stderr if stream is None else stream
    found = checkpoints(checkpoint_dir)
    if not found:
        raise ValueError(f"--resume: no epoch_*.npz checkpoint in {checkpoint_dir}")
    newest_reason = None
    for number, path in reversed(found):
        try:
            epoch = load_checkpoint(model, path)
            if epoch != number:
                raise ValueError(f"{path} holds the state after epoch {epoch}, not {number} (renamed?)")
        except ValueError as err:
            newest_reason = newest_reason or str(err)
            print(f"warning: --resume skips {path}: {err}", file=stream, flush=True)
            continue
        return epoch, path
    raise ValueError(f"--resume: none of the {len(found)} checkpoint(s) in {checkpoint_dir} is usable (the "
                     f"warnings above say why); the newest: {newest_reason}")


def train(model_path, data_path, epochs, batch_size, checkpoint_dir=None, resume=False, seed=0,
          loss_log=None, num_threads=None, progress=True, keep=3, xnnpack=False):
    """Trains for ``epochs`` epochs in total (a resumed run continues after its checkpoint).

    Checkpoints go to ``checkpoint_dir`` after every epoch (atomically; the newest
    ``keep`` are kept, None: all); ``resume`` restarts from the newest usable one there (a
    newer unreadable or non-matching one is skipped with a warning on stderr). A run that
    does not resume refuses a ``checkpoint_dir`` already holding checkpoints. ``loss_log``
    (a path) gets one ``epoch,step,loss`` line per step (appended). Returns a summary dict:
    losses, median step time, wall time, peak RSS (``ru_maxrss``) after loading the
    model and data (``setup_peak_rss_mib``) and at the end (``peak_rss_mib``), and
    ``interpreter_peak_mib`` (:class:`InterpreterMemory`: the peak RSS growth from model load
    through training beyond the runtime and the data; None where it cannot be measured).
    ``xnnpack``: LiteRT's XNNPACK delegate, off by default (:func:`open_interpreter`).

    Raises:
        ValueError: bad arguments, model, data or checkpoints (the message says which and
            what to do), or a non-finite loss or state (no checkpoint of it is written).
    """
    start = time.perf_counter()
    _check_positive("--epochs", epochs)
    _check_positive("--batch-size", batch_size)
    if keep is not None:
        _check_positive("--keep", keep)
    if resume and checkpoint_dir is None:
        raise ValueError("--resume needs --checkpoint-dir")
    memory = InterpreterMemory()
    model = TrainingModel(model_path, num_threads, xnnpack)
    x, y = load_data(data_path)
    memory.data_bytes = x.nbytes + y.nbytes
    model.check_data(x, y, data_path)
    if model.train_batch_size not in (None, batch_size):
        raise ValueError(f"{model_path} trains on batches of {model.train_batch_size} (fixed at export); "
                         f"use --batch-size {model.train_batch_size}")
    if batch_size > len(x):
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(x)} training examples of "
                         f"{data_path} (only full batches are trained); use at most {len(x)}")
    first_epoch, resumed_from = 1, None
    if checkpoint_dir is not None:
        if os.path.isdir(checkpoint_dir):
            remove_stale_temporaries(checkpoint_dir)
        if resume:
            done, resumed_from = resume_latest(model, checkpoint_dir)
            first_epoch = done + 1
            if first_epoch > epochs:
                print(f"note: {resumed_from} is already after epoch {done} >= --epochs {epochs}; nothing to train",
                      file=sys.stderr)
        elif checkpoints(checkpoint_dir):
            names = [os.path.basename(p) for _, p in checkpoints(checkpoint_dir)]
            raise ValueError(f"{checkpoint_dir} already holds checkpoints ({_listed(names)}) of another run; "
                             "pass --resume to continue it, or use an empty --checkpoint-dir")
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
                if not np.isfinite(loss):
                    newest = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
                    kept = f"the newest checkpoint is still {newest[1]}" if newest else "no checkpoint is written"
                    raise ValueError(f"training diverged: the loss is {loss} at epoch {epoch} step {step}; "
                                     f"{kept}; lower the learning rate (export) or check the data")
                if bar:
                    bar.update(step, float(np.mean(losses)), step_ms=float(np.median(step_times)) * 1e3,
                               memory_mib=memory.mib())
            epoch_losses.append(float(np.mean(losses)))
            if checkpoint_dir is not None:
                save_checkpoint(model, checkpoint_dir, epoch, keep=keep)
            else:
                finite_state(model, epoch)  # a diverged state fails the run even with no checkpoint
    finally:
        if log:
            log.close()
    return {
        "command": "train",
        "first_epoch": first_epoch,
        "resumed_from": resumed_from,
        "epochs": epochs,
        "steps": len(step_times),
        "batch_size": batch_size,
        "epoch_losses": epoch_losses,
        "median_step_ms": float(np.median(step_times) * 1e3) if step_times else None,
        "wall_s": time.perf_counter() - start,
        "setup_peak_rss_mib": setup_rss,
        "peak_rss_mib": peak_rss_mib(),
        "interpreter_peak_mib": memory.mib(),
    }


def infer(model_path, data_path, batch_size=256, weights=None, num_threads=None):
    """Logits for every input of ``data_path``; accuracy when it has labels.

    ``weights``: optional checkpoint ``.npz`` loaded first (checked against the model).
    Returns ``(summary dict, logits)``.
    """
    start = time.perf_counter()
    _check_positive("--batch-size", batch_size)
    model = TrainingModel(model_path, num_threads)
    if weights is not None:
        load_checkpoint(model, weights, require_epoch=False)
    x, y = load_data(data_path, need_labels=False)
    model.check_data(x, y, data_path)
    logits = np.concatenate([model.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    summary = {"command": "infer", "examples": len(x)}
    if y is not None:
        summary["accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == y))
    summary.update(wall_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib())
    return summary, logits
