"""What the example scripts (``examples/label_noise.py``, ``examples/easy_vs_hard.py``)
and the ``aggregate`` workflow share besides the library:

* :func:`example_parser`, :func:`load_train_test`, :func:`model_builder` -- the
  example scripts' command line, data and models;
* :func:`log_spaced_epochs`, :func:`write_csv` / :func:`read_rows`,
  :func:`plot_accuracy_panels` (several runs), :func:`plot_run` (one run);
* re-exported for the scripts: the arms (:func:`~keras_coherence.aggregation.arms.parse_arm`,
  ...), :class:`~keras_coherence.callbacks.SubsetAccuracy` and
  :func:`~keras_coherence.callbacks.classification_accuracy` (as ``accuracy``).

>>> log_spaced_epochs(100, 12)
[0, 1, 2, 4, 5, 8, 12, 19, 28, 43, 66, 100]
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_coherence import data, models
from keras_coherence._keras import keras
from keras_coherence.aggregation.arms import Arm, build_arm_model, check_arm, parse_arm
from keras_coherence.callbacks import SubsetAccuracy
from keras_coherence.callbacks import classification_accuracy as accuracy

__all__ = [
    "Arm", "SubsetAccuracy", "accuracy", "arm_styles", "build_arm_model", "check_arm", "example_parser",
    "load_train_test", "log_spaced_epochs", "model_builder", "parse_arm", "plot_accuracy_panels", "plot_run",
    "read_rows", "write_csv",
]


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


def log_spaced_epochs(total: int, n: int = 20) -> List[int]:
    """About ``n`` epochs from 0 to ``total`` (both included), log-spaced, as integers."""
    if total <= 0:
        return [0]
    points = {0, int(total)}
    for v in np.geomspace(1, total, max(2, n)):
        points.add(int(round(v)))
    return sorted(points)


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
