"""Shared code of the aggregation experiments (``examples/label_noise.py``,
``examples/easy_vs_hard.py`` and the ``aggregate`` command).

* :func:`parse_arm` / :class:`Arm` -- a training "arm" from a string: ``"sgd"``
  (``"mean"``), ``"winsorized:c=4"`` (any :func:`keras_coherence.aggregation.get`
  spec), ``"m3"``, ``"rm3"`` / ``"ra3"`` (``"rm5"``, ``"ra5"``, ... for other windows).
* :func:`check_arm` -- reject arms that cannot train with a batch size / data size
  *before* training (e.g. a winsorized ``c`` too large for the last, short batch).
* :func:`build_arm_model` -- a compiled model that trains with an arm: plain SGD for
  ``sgd``, :func:`~keras_coherence.aggregation.with_aggregator` for winsorized and M3,
  :class:`~keras_coherence.optimizers.RunningMedian` around SGD for RM3 / RA3.
* :func:`example_parser`, :func:`load_train_test`, :func:`model_builder` -- the
  command line, data and models the example scripts share.
* :class:`SubsetAccuracy` -- a callback that records the accuracy on named subsets
  (pristine / corrupt training examples, the test set, ...) at chosen epochs.
* :func:`accuracy`, :func:`log_spaced_epochs`, :func:`write_csv` / :func:`read_rows`,
  :func:`plot_accuracy_panels` (several runs), :func:`plot_run` (one run) -- helpers.

>>> parse_arm("winsorized:c=4").label, parse_arm("rm3").label, parse_arm("sgd").label
('WGD c=4', 'RM3', 'SGD')
>>> log_spaced_epochs(100, 12)
[0, 1, 2, 4, 5, 8, 12, 19, 28, 43, 66, 100]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_coherence import data, models
from keras_coherence._keras import keras, tf

__all__ = [
    "Arm", "SubsetAccuracy", "accuracy", "arm_styles", "build_arm_model", "check_arm", "example_parser",
    "load_train_test", "log_spaced_epochs", "model_builder", "parse_arm", "plot_accuracy_panels", "plot_run",
    "read_rows", "write_csv",
]

_RUNNING = re.compile(r"^(rm|ra)(\d+)$")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to train: ``kind`` is ``"sgd"``, ``"aggregator"`` (per-batch robust
    aggregation through ``with_aggregator``) or ``"running"`` (RM/RA optimizer wrapper)."""

    spec: str                      # canonical string, e.g. "winsorized:c=4", "rm3", "sgd"
    label: str                     # for plots and tables, e.g. "WGD c=4", "RM3"
    kind: str
    aggregator: object = None      # an Aggregator for kind == "aggregator"
    window: int = 0                # for kind == "running"
    reduction: str = "median"      # "median" (RM) or "mean" (RA)


def parse_arm(spec) -> Arm:
    """An :class:`Arm` from ``"sgd"``/``"mean"``, an aggregator spec (``"winsorized:c=4"``,
    ``"wgd:c=2"``, ``"m3"``, ``"m3:groups=5"``), or ``"rm3"`` / ``"ra3"`` (``"rmN"``,
    ``"raN"`` for a window of N). Raises ``ValueError`` with a readable message."""
    from keras_coherence.aggregation import Aggregator, get

    if isinstance(spec, Arm):
        return spec
    if isinstance(spec, Aggregator):
        aggregator = spec
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"An arm must be a non-empty string, got {spec!r}.")
        text = spec.strip().lower()
        match = _RUNNING.match(text)
        if match:
            window = int(match.group(2))
            if window < 1:
                raise ValueError(f"{spec!r}: the window must be at least 1 (e.g. rm3).")
            median = match.group(1) == "rm"
            return Arm(text, f"{'RM' if median else 'RA'}{window}", "running", window=window,
                       reduction="median" if median else "mean")
        if text in ("rm", "ra", "running_median", "running_average"):
            raise ValueError(f"{spec!r}: give the window, e.g. rm3 or ra3.")
        try:
            aggregator = get(text)  # ValueError for unknown names and bad arguments
        except ValueError as err:
            if str(err).startswith("Unknown aggregator"):
                raise ValueError(
                    f"Unknown aggregator {spec.strip()!r}; known: sgd (= mean), winsorized:c=C "
                    "(= wgd), winsorized:percentile=P, m3 (= median_of_means, m3:groups=G), "
                    "rm3 / ra3 (rmN / raN for a window of N).") from None
            raise
    if aggregator.plain:  # the mean gradient: Keras's own train step
        return Arm("sgd", aggregator.label(), "sgd")
    return Arm(aggregator.spec(), aggregator.label(), "aggregator", aggregator=aggregator)


def check_arm(arm: Arm, batch_size: int, num_train: Optional[int] = None) -> None:
    """Raise ``ValueError`` if ``arm`` cannot train with ``batch_size`` on ``num_train``
    examples: a winsorized ``c`` with ``2c >= batch`` (for the full batches or the
    last, shorter one that Keras's ``fit`` makes when ``batch_size`` does not divide
    ``num_train``), or more M3 groups than examples in a batch."""
    batches = [(batch_size, "a batch")]
    if num_train is not None:
        if num_train < batch_size:
            batches = [(num_train, f"the only batch ({num_train} training examples)")]
        elif num_train % batch_size:
            batches.append((num_train % batch_size, f"the last batch ({num_train} % {batch_size})"))
    if arm.aggregator is None:
        return
    for b, which in batches:
        try:
            arm.aggregator.check_batch(b, which)
        except ValueError as err:
            raise ValueError(f"{arm.spec}: {err}") from None


def build_arm_model(arm, base_model: keras.Model, lr: float,
                    report_coherence: bool = False, metrics=("accuracy",)) -> keras.Model:
    """A model compiled to train with ``arm`` (an :class:`Arm` or a spec string), sharing
    ``base_model``'s layers and weights; the loss is sparse cross-entropy on logits.

    * ``sgd``: ``base_model`` itself with ``SGD(lr)`` (no momentum);
    * aggregators: ``with_aggregator(base_model, spec)`` with ``SGD(lr)``;
    * ``rmN`` / ``raN``: ``base_model`` with ``RunningMedian(SGD(lr), window=N)``.

    ``report_coherence=True`` logs the training batch's ``m_coherence`` and ``alpha``
    on every step (``with_coherence`` for SGD / RM / RA, ``with_aggregator(...,
    report_coherence=True)`` for aggregators).
    """
    from keras_coherence.aggregation import with_aggregator
    from keras_coherence.coherence import with_coherence
    from keras_coherence.optimizers import RunningMedian

    arm = parse_arm(arm)
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    if arm.kind == "aggregator":
        model = with_aggregator(base_model, arm.aggregator, report_coherence=report_coherence)
    else:
        model = with_coherence(base_model) if report_coherence else base_model
        if arm.kind == "running":
            optimizer = RunningMedian(optimizer, window=arm.window, reduction=arm.reduction,
                                      name="RunningMedian" if arm.reduction == "median" else "RunningAverage")
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=list(metrics))
    return model


# --------------------------------------------------------------------------------------
# The example scripts' command line, data and models
# --------------------------------------------------------------------------------------


def example_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with ``--dataset`` and
    ``--data-dir`` (the options of :func:`load_train_test`); the script adds the rest."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="embedded_mnist",
                   help="'embedded_mnist' or a tensorflow_datasets name prepared under --data-dir")
    p.add_argument("--data-dir", default=None)
    return p


def load_train_test(dataset: str, data_dir: Optional[str] = None, max_train: int = 0):
    """``(x_train, y_train), (x_test, y_test), num_classes``: the first ``max_train``
    training examples (0 = all) and the whole test split; ``num_classes`` from the
    dataset's info, else from the training labels."""
    x_train, y_train = data.load_dataset(dataset, split="train", data_dir=data_dir,
                                         max_examples=max_train or None)
    x_test, y_test = data.load_dataset(dataset, split="test", data_dir=data_dir)
    info = data.dataset_info(dataset, data_dir=data_dir)
    num_classes = int(info.get("num_classes") or y_train.max() + 1)
    return (x_train, y_train), (x_test, y_test), num_classes


def model_builder(model: str, input_shape: Sequence[int], num_classes: int,
                  hidden: Sequence[int] = ()) -> Callable[[], keras.Model]:
    """A function that builds a fresh, uncompiled ``"mlp"`` (hidden widths ``hidden``)
    or ``"cnn"`` (:func:`keras_coherence.models.small_cnn`) on each call."""
    if model == "mlp":
        return lambda: models.mlp(input_shape, num_classes, hidden=tuple(hidden))
    return lambda: models.small_cnn(input_shape, num_classes)


# --------------------------------------------------------------------------------------
# Accuracy on subsets while training
# --------------------------------------------------------------------------------------


def _predict_classes_fn(model):
    @tf.function(reduce_retracing=True)
    def predict(x):
        return tf.argmax(model(x, training=False), axis=-1, output_type=tf.int64)
    return predict


def accuracy(model: keras.Model, x, y, batch_size: int = 1000, _fn=None) -> float:
    """Fraction of ``x`` whose argmax prediction equals the integer label ``y`` (nan when
    empty)."""
    if len(x) == 0:
        return float("nan")
    fn = _fn or _predict_classes_fn(model)
    pred = np.concatenate([fn(tf.constant(x[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)])
    return float(np.mean(pred == np.asarray(y).reshape(-1)))


def log_spaced_epochs(total: int, n: int = 20) -> List[int]:
    """About ``n`` epochs from 0 to ``total`` (both included), log-spaced, as integers."""
    if total <= 0:
        return [0]
    points = {0, int(total)}
    for v in np.geomspace(1, total, max(2, n)):
        points.add(int(round(v)))
    return sorted(points)


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
                predictions[key] = (np.concatenate([
                    self._fn(tf.constant(x[i:i + self.batch_size])).numpy()
                    for i in range(0, len(x), self.batch_size)]) if len(x) else np.zeros(0, np.int64))
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


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def write_csv(path: str, rows: Sequence[Mapping], columns: Optional[Sequence[str]] = None) -> str:
    """Write dict rows to ``path`` (columns: ``columns`` or the union in first-seen order)."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return path


def read_rows(path: str) -> List[Dict[str, object]]:
    """Rows written by :func:`write_csv` back as dicts: numbers as floats (``epoch``,
    ``step``, ``seed`` as ints), empty cells as None, other text unchanged."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, text in raw.items():
                if text is None or text == "":
                    row[key] = None
                    continue
                try:
                    value = float(text)
                except ValueError:
                    row[key] = text
                    continue
                row[key] = int(value) if key in ("epoch", "step", "seed") and math.isfinite(value) else value
            rows.append(row)
    return rows


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(round(value, 6))
    return value


def arm_styles(labels: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """Line styles that group arms by family: SGD black, winsorized arms in shades of
    one colour map (light = small c), M3 / RM / RA in blue / green / grey dashes."""
    from matplotlib import colormaps

    styles: Dict[str, Dict[str, object]] = {}
    wgd = [label for label in labels if label.startswith("WGD")]
    cmap = colormaps["plasma"]
    for i, label in enumerate(wgd):
        styles[label] = {"color": cmap(0.75 - 0.65 * i / max(1, len(wgd) - 1)), "linestyle": "-"}
    for label in labels:
        if label == "SGD":
            styles[label] = {"color": "black", "linestyle": "-", "linewidth": 2.0}
        elif label.startswith("M3"):
            styles[label] = {"color": "tab:blue", "linestyle": "--"}
        elif label.startswith("RM"):
            styles[label] = {"color": "tab:green", "linestyle": "--"}
        elif label.startswith("RA"):
            styles[label] = {"color": "tab:gray", "linestyle": ":"}
    return styles


def plot_accuracy_panels(runs: Mapping[str, Sequence[Mapping]], path: str,
                         panels: Sequence[Tuple[str, str]], title: Optional[str] = None,
                         xkey: str = "epoch", xlabel: str = "epoch", chance: Optional[float] = None,
                         xscale: str = "linear", dpi: int = 100,
                         styles: Optional[Mapping[str, Mapping]] = None) -> str:
    """One panel per ``(column, panel title)`` in ``panels``, each with one line per run
    of ``runs = {label: rows}`` (``column`` vs ``xkey``); saved to ``path``. ``chance``
    draws a dotted reference line (e.g. 0.1 for ten classes); ``styles`` maps labels to
    ``plot`` keyword arguments (default :func:`arm_styles`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels) + 1.6, 4.0))
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    styles = arm_styles(list(runs)) if styles is None else styles
    for j, (label, rows) in enumerate(runs.items()):
        style = {"color": f"C{j % 10}", "linestyle": "-", "linewidth": 1.5, **styles.get(label, {})}
        for ax, (column, _) in zip(axes, panels):
            pts = [(r[xkey], r[column]) for r in rows
                   if r.get(column) is not None and not math.isnan(float(r[column]))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) <= 25 else None, markersize=3, label=label,
                        **style)
    for ax, (column, panel_title) in zip(axes, panels):
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1.0)
        if xscale == "symlog":
            ax.set_xscale("symlog", linthresh=1.0)
        elif xscale != "linear":
            ax.set_xscale(xscale)
        ax.set_title(panel_title, fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


_RUN_LINES = (("pristine_accuracy", "pristine training examples", "C0", "-"),
              ("corrupt_accuracy", "corrupt examples, noisy labels", "C3", "-"),
              ("corrupt_true_accuracy", "corrupt examples, true labels", "C3", ":"),
              ("test_accuracy", "test set", "C2", "-"))


def plot_run(rows: Sequence[Mapping], path: str, title: Optional[str] = None,
             chance: Optional[float] = None, dpi: int = 100) -> str:
    """One run's :class:`SubsetAccuracy` rows: accuracies vs epoch (left) and, when the
    rows have it, the training batches' mean ``m_coherence`` per epoch (right, log y)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: nothing to plot.")
    coherence = [(r["epoch"], r["m_coherence"]) for r in rows
                 if r.get("m_coherence") is not None and math.isfinite(r["m_coherence"])
                 and r["m_coherence"] > 0]
    fig = Figure(figsize=(10.0 if coherence else 6.5, 4.2))
    ax = fig.add_subplot(1, 2 if coherence else 1, 1)
    for key, label, color, style in _RUN_LINES:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=color, linestyle=style, marker="o" if len(xs) <= 25 else None,
                    markersize=3, linewidth=1.6, label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1.0, label=f"chance ({chance:g})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if coherence:
        ax2 = fig.add_subplot(1, 2, 2)
        xs, ys = zip(*coherence)
        ax2.plot(xs, ys, color="C4", marker="o" if len(xs) <= 25 else None, markersize=3)
        ax2.axhline(1.0, color="grey", linestyle=":", linewidth=1.0, label="orthogonal limit (1)")
        ax2.set_yscale("log")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("batch m-coherence (epoch mean)")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path
