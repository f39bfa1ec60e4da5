"""Every Keras callback of the package, in one place:

* :class:`CoherenceMonitor` (here): gradient coherence of a fixed probe sample during any
  ``model.fit``, without changing the model;
* ``ScaleMonitor``: every PO2 quantizer's exponents, flips and MSQE during QAT
  (defined in ``keras_coherence.quantization.monitor``; loaded on first use, it needs tfmot);
* :class:`SubsetAccuracy` (here): accuracy on named subsets (clean / corrupted labels) per epoch;
* ``StepTimer``: the wall time of every training batch (``keras_coherence.quantization.evaluate``).
"""
from __future__ import annotations

import csv
import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_coherence._keras import keras, tf
from keras_coherence.coherence.stats import gradient_stats, validate_sample


class CoherenceMonitor(keras.callbacks.Callback):
    """Measures m-coherence and alpha of a fixed probe sample while a model trains.

    Per-example gradients are taken on the probe sample (never on mini-batches, which
    inflate coherence) with the per-layer rules of :func:`gradient_stats`.

    Args:
      x, y, sample_weight: the fixed probe sample.
      every_n_steps: measure every N training steps (and at the start); ``None``
        measures at the start and at the end of every epoch.
      per_layer: also log each layer's m-coherence (``m_coherence/<layer>``).
      batchnorm: ``"inference"`` (default) or ``"batch"``, see :func:`gradient_stats`.
      batch_size: micro-batch size of the probe pass.
      csv_path: append one row per measurement to this CSV file.
      log_dir: write TensorBoard scalars here (``tf.summary``), at the global step.
      prefix: prefix of the keys written to the epoch logs / History.

    After training, ``monitor.history`` is a list of dicts
    ``{"step", "epoch", "m_coherence", "alpha", ...}`` (``epoch`` counts completed
    epochs, fractional between epoch ends); it always starts at step 0 and ends at the
    final step. The last measurement of each epoch also lands in the epoch logs, hence
    in ``model.fit(...).history``.

    Example:
      >>> import numpy as np, keras_coherence as kc
      >>> model = kc.keras.Sequential([kc.keras.layers.Dense(3, input_shape=(4,))])
      >>> model.compile("sgd", kc.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      >>> x, y = np.random.rand(16, 4), np.random.randint(0, 3, 16)
      >>> monitor = kc.callbacks.CoherenceMonitor(x, y)
      >>> h = model.fit(x, y, epochs=2, callbacks=[monitor], verbose=0)
      >>> len(h.history["m_coherence"]), len(monitor.history)
      (2, 3)
    """

    def __init__(self, x, y, sample_weight=None, *, every_n_steps: Optional[int] = None,
                 per_layer: bool = True, batchnorm: str = "inference", batch_size: int = 256,
                 csv_path: Optional[str] = None, log_dir: Optional[str] = None, prefix: str = ""):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps}.")
        validate_sample(x, y, sample_weight)  # fail at construction, not when fit starts
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.batchnorm = batchnorm
        self.batch_size = batch_size
        self.csv_path = csv_path
        self.log_dir = log_dir
        self.prefix = prefix
        self.history: List[Dict[str, float]] = []
        self._step = 0
        self._epoch = 0
        self._writer = None
        self._csv_fields = None

    def measure(self) -> Dict[str, float]:
        """Measure now and record the result."""
        stats = gradient_stats(self.model, self.x, self.y, self.sample_weight,
                               batch_size=self.batch_size, batchnorm=self.batchnorm)
        row = {"step": self._step, "epoch": self._epochs_done(), "m": stats.m,
               **stats.as_dict(per_layer=self.per_layer)}
        self.history.append(row)
        self._write(row)
        return row

    def _write(self, row):
        if self.csv_path:
            new = not os.path.exists(self.csv_path) or self._csv_fields is None
            if self._csv_fields is None:
                self._csv_fields = list(row)
            with open(self.csv_path, "w" if new else "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._csv_fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
        if self.log_dir:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                for key, value in row.items():
                    if key not in ("step", "epoch", "m"):
                        tf.summary.scalar(key, value, step=self._step)
            self._writer.flush()

    def _epochs_done(self):
        steps = (self.params or {}).get("steps")
        return self._step / steps if steps else float(self._epoch)

    def on_train_begin(self, logs=None):
        self.measure()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.every_n_steps is not None and self._step % self.every_n_steps == 0:
            self.measure()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if self.every_n_steps is None:
            self.measure()
        if logs is not None and self.history:
            for key, value in self.history[-1].items():
                if key not in ("step", "epoch", "m"):
                    logs[self.prefix + key] = value

    def on_train_end(self, logs=None):
        if self.history and self.history[-1]["step"] != self._step:
            self.measure()  # always end on the final weights
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _predict_classes_fn(model):
    @tf.function(reduce_retracing=True)
    def predict(x):
        return tf.argmax(model(x, training=False), axis=-1, output_type=tf.int64)
    return predict


def classification_accuracy(model: keras.Model, x, y, batch_size: int = 1000, _fn=None) -> float:
    """Fraction of ``x`` whose argmax prediction equals the integer label ``y`` (nan when
    empty)."""
    if len(x) == 0:
        return float("nan")
    pred = _predicted_classes(_fn or _predict_classes_fn(model), x, batch_size)
    return float(np.mean(pred == np.asarray(y).reshape(-1)))


def _predicted_classes(fn, x, batch_size):
    """``fn`` (a :func:`_predict_classes_fn`) over ``x`` in batches; empty for no examples."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([fn(tf.constant(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)])


class SubsetAccuracy(keras.callbacks.Callback):
    """Record the accuracy on named subsets ``{name: (x, y)}`` before training (epoch 0)
    and after the epochs in ``epochs`` (1-based; ``None`` = after every epoch).

    Subsets that share the same ``x`` object (e.g. the corrupt examples scored against
    their noisy and their true labels) are predicted once. Each row of :attr:`rows` has
    ``epoch``, ``step``, ``seconds`` (training time so far, evaluation excluded),
    ``<name>_accuracy`` for each subset, ``loss`` (mean training loss of the epoch,
    with its other logged metrics such as ``accuracy`` as ``train_<metric>``) and,
    when the model logs it, ``m_coherence`` (mean over the epoch's batches).
    ``on_row(row)`` is called with each new row (e.g. to print progress). With
    ``add_to_logs=True`` the accuracies also go into the epoch's logs as
    ``<name>_acc``, so Keras's progress bar and ``History`` show them.
    """

    def __init__(self, subsets: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                 epochs: Optional[Sequence[int]] = None, batch_size: int = 1000, on_row=None,
                 add_to_logs: bool = False):
        super().__init__()
        self.subsets = dict(subsets)
        self.add_to_logs = add_to_logs
        self.epochs = None if epochs is None else set(int(e) for e in epochs)
        self.batch_size = batch_size
        self.on_row = on_row
        self.rows: List[Dict[str, float]] = []
        self.epoch_seconds: List[float] = []  # training time of each epoch
        self._fn = None
        self._step = 0
        self._seconds = 0.0
        self._batch_logs: Dict[str, List[float]] = {}

    def _measure(self, epoch, epoch_logs=None):
        if self._fn is None:
            self._fn = _predict_classes_fn(self.model)
        predictions = {}
        row = {"epoch": epoch, "step": self._step, "seconds": round(self._seconds, 4)}
        for name, (x, y) in self.subsets.items():
            key = id(x)
            if key not in predictions:
                predictions[key] = _predicted_classes(self._fn, x, self.batch_size)
            pred = predictions[key]
            row[f"{name}_accuracy"] = float(np.mean(pred == np.asarray(y).reshape(-1))) if len(x) else float("nan")
        for key, values in self._batch_logs.items():
            if values:
                row[key if key in ("loss", "m_coherence", "alpha") else f"train_{key}"] = float(np.mean(values))
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def on_train_begin(self, logs=None):
        if not self.rows:
            self._measure(0)

    def on_epoch_begin(self, epoch, logs=None):
        self._batch_logs = {}
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        for key, value in (logs or {}).items():
            if key in ("m_coherence", "alpha"):  # per-batch values: average them
                self._batch_logs.setdefault(key, []).append(float(value))

    def steady_seconds_per_epoch(self) -> float:
        """Median training time of an epoch, the first (which traces the step) left out
        when there are others."""
        times = self.epoch_seconds[1:] or self.epoch_seconds
        return float(np.median(times)) if times else float("nan")

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._t0)
        self._seconds += self.epoch_seconds[-1]
        for key, value in (logs or {}).items():  # Keras's running means over the epoch
            if key not in ("m_coherence", "alpha"):
                self._batch_logs[key] = [float(value)]
        if self.epochs is None or epoch + 1 in self.epochs:
            self._measure(epoch + 1)
            if self.add_to_logs and logs is not None:
                for name in self.subsets:
                    logs[f"{name}_acc"] = self.rows[-1][f"{name}_accuracy"]


# Callbacks that live next to what they watch, re-exported here on first use (importing
# them eagerly would pull tfmot into ``import keras_coherence``).
_ELSEWHERE = {
    "ScaleMonitor": "keras_coherence.quantization.monitor",
    "StepTimer": "keras_coherence.quantization.evaluate",
}


def __getattr__(name):
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module 'keras_coherence.callbacks' has no attribute {name!r}")
