"""Plots of gradient coherence during training (matplotlib, no display needed).

Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas
directly, never through ``pyplot``: nothing here needs a display or changes the
global matplotlib backend, so it is safe on headless machines and inside notebooks.

* :func:`plot_coherence` -- one run: whole-model m-coherence (log y) vs training
  step, optionally one thin line per layer.
* :func:`plot_coherence_comparison` -- several runs on one figure.
* :func:`draw_coherence` -- the same lines on an existing ``Axes``.
* :func:`read_history_csv` -- rows back from a ``CoherenceMonitor`` CSV file.

Rows are the dicts of :attr:`keras_coherence.callbacks.CoherenceMonitor.history`
(``{"step", "epoch", "m_coherence", "alpha", "m_coherence/<layer>", ...}``), or the
same read back from its CSV file (strings are converted).
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "draw_coherence",
    "layer_names",
    "plot_coherence",
    "plot_coherence_comparison",
    "read_history_csv",
]

_KEY = "m_coherence"
_LAYER_PREFIX = _KEY + "/"
_XSCALES = ("linear", "log", "symlog")


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_history_csv(path: str) -> List[Dict[str, float]]:
    """Rows of a ``CoherenceMonitor`` CSV file as dicts of floats (``step`` and
    ``epoch`` as ints)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {k: _float(v) for k, v in raw.items() if k is not None}
            for k in ("step", "epoch", "m"):
                if k in row and math.isfinite(row[k]):
                    row[k] = int(row[k])
            rows.append(row)
    return rows


def layer_names(rows: Iterable[Mapping]) -> List[str]:
    """Layer names that have an ``m_coherence/<layer>`` column, in first-seen order."""
    names: List[str] = []
    for row in rows:
        for key in row:
            if key.startswith(_LAYER_PREFIX) and key[len(_LAYER_PREFIX):] not in names:
                names.append(key[len(_LAYER_PREFIX):])
    return names


def _check_rows(rows, what="history_rows"):
    rows = list(rows)
    if not rows:
        raise ValueError(f"{what} is empty: nothing to plot.")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "step" not in row or _KEY not in row:
            raise ValueError(
                f"{what}[{i}] must be a dict with 'step' and '{_KEY}' keys "
                f"(a CoherenceMonitor history row), got {row!r:.120}."
            )
    return rows


def _series(rows, key):
    """(steps, values) of ``key``, keeping only finite positive values (log axis)."""
    xs, ys = [], []
    for row in rows:
        x, y = _float(row.get("step")), _float(row.get(key))
        if math.isfinite(x) and math.isfinite(y) and y > 0:
            xs.append(x)
            ys.append(y)
    return xs, ys


def draw_coherence(ax, history_rows: Sequence[Mapping], label: Optional[str] = None,
                   per_layer: bool = True, color=None, xscale: str = "linear",
                   reference_line: bool = True, smooth: int = 0) -> None:
    """Draw one run's m-coherence on ``ax``: the whole model as a thick line (with
    markers), each layer as a thin dashed line (in the run's colour when ``label`` is
    given) when ``per_layer``; log y axis; a dotted reference line at 1 (orthogonal
    gradients). With ``smooth > 1`` the whole-model values are drawn faintly and a
    centred running median over ``smooth`` measurements as the thick line (SGD with a
    large step size makes the probe's coherence jump from step to step)."""
    rows = _check_rows(history_rows)
    if xscale not in _XSCALES:
        raise ValueError(f"xscale must be one of {_XSCALES}, got {xscale!r}.")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be an integer >= 0 (a window in measurements), got {smooth!r}.")
    xs, ys = _series(rows, _KEY)
    whole = label if label is not None else "whole model"
    if smooth > 1:
        (line,) = ax.plot(xs, ys, marker="o", markersize=2, linewidth=0.6, alpha=0.35, color=color)
        ax.plot(xs, _rolling_median(ys, smooth), linewidth=2.0, color=line.get_color(),
                label=f"{whole} (median of {smooth})")
    else:
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.0, color=color, label=whole)
    if per_layer:
        names = layer_names(rows)
        for name in names:
            lx, ly = _series(rows, _LAYER_PREFIX + name)
            if not lx:
                continue
            layer_label = f"{label}: {name}" if label is not None else name
            kwargs = {"color": line.get_color()} if label is not None else {}
            ax.plot(lx, ly, linewidth=1.0, linestyle="--", alpha=0.7, label=layer_label, **kwargs)
    if reference_line:
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1.0, label="orthogonal limit (1)")
    ax.set_yscale("log")
    if xscale == "symlog":
        ax.set_xscale("symlog", linthresh=1.0)
    elif xscale == "log":
        ax.set_xscale("log")  # step 0 cannot be shown on a log axis; matplotlib drops it
    ax.set_xlabel("training step")
    ax.set_ylabel("m-coherence  ||Σ g_i||² / Σ ||g_i||²")
    ax.grid(True, which="both", alpha=0.3)


def _rolling_median(values, window):
    """Centred running median (shorter windows at the ends)."""
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = sorted(values[max(0, i - half): i + half + 1])
        mid = len(chunk) // 2
        out.append(chunk[mid] if len(chunk) % 2 else 0.5 * (chunk[mid - 1] + chunk[mid]))
    return out


def _save(fig, path, dpi):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def plot_coherence(history_rows: Sequence[Mapping], path: str, title: Optional[str] = None,
                   per_layer: bool = True, xscale: str = "linear", dpi: int = 100,
                   figsize=(7.0, 4.5), smooth: int = 0) -> str:
    """Plot one run's m-coherence vs training step and save it to ``path``.

    Args:
        history_rows: ``CoherenceMonitor.history`` (or :func:`read_history_csv`).
        path: output file; the format follows the extension (``.png``, ``.pdf``,
            ``.svg``); missing directories are created.
        title: figure title (default ``"Gradient coherence"``).
        per_layer: also draw each layer's m-coherence (if the rows have them).
        xscale: ``"linear"``, ``"log"`` or ``"symlog"`` (log-like, keeps step 0).
        dpi, figsize: output size.
        smooth: if > 1, also draw a running median over this many measurements
            (raw values stay visible, faintly).

    Returns:
        ``path``.

    >>> import os, tempfile
    >>> rows = [{"step": 0, "m_coherence": 40.0, "m_coherence/dense": 30.0},
    ...         {"step": 10, "m_coherence": 5.0, "m_coherence/dense": 4.0}]
    >>> out = plot_coherence(rows, os.path.join(tempfile.mkdtemp(), "c.png"))
    >>> os.path.getsize(out) > 0
    True
    """
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    draw_coherence(ax, history_rows, per_layer=per_layer, xscale=xscale, smooth=smooth)
    ax.set_title(title if title is not None else "Gradient coherence")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_coherence_comparison(runs: Mapping[str, Sequence[Mapping]], path: str,
                              title: Optional[str] = None, per_layer: bool = False,
                              xscale: str = "linear", dpi: int = 100, figsize=(7.0, 4.5),
                              secondary_key: Optional[str] = None,
                              secondary_label: Optional[str] = None, smooth: int = 0) -> str:
    """Plot several runs' m-coherence on one figure and save it to ``path``.

    Args:
        runs: ``{label: history_rows}``; one colour per run.
        path, title, xscale, dpi, figsize, smooth: as in :func:`plot_coherence`.
        per_layer: also draw each run's layers (thin dashed, in the run's colour).
        secondary_key: if given (e.g. ``"train_accuracy"``), a second panel below
            plots this key of the rows (linear y) for every run that has it.
        secondary_label: y-axis label of that panel (default: the key).

    Returns:
        ``path``.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty {label: history_rows} mapping.")
    for label, rows in runs.items():
        _check_rows(rows, what=f"runs[{label!r}]")
    two = secondary_key is not None
    fig = Figure(figsize=(figsize[0], figsize[1] * (1.6 if two else 1.0)))
    if two:
        ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    else:
        ax, ax2 = fig.add_subplot(1, 1, 1), None
    colors = [c["color"] for c in _color_cycle(len(runs))]
    for (label, rows), color in zip(runs.items(), colors):
        draw_coherence(ax, rows, label=str(label), per_layer=per_layer, color=color,
                       xscale=xscale, smooth=smooth, reference_line=False)
        if ax2 is not None:
            sx, sy = [], []
            for row in rows:
                x, y = _float(row.get("step")), _float(row.get(secondary_key))
                if math.isfinite(x) and math.isfinite(y):
                    sx.append(x)
                    sy.append(y)
            if sx:
                ax2.plot(sx, sy, marker="o", markersize=3, color=color, label=str(label))
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1.0, label="orthogonal limit (1)")
    ax.set_title(title if title is not None else "Gradient coherence")
    ax.legend(fontsize="small", loc="best")
    if ax2 is not None:
        ax.set_xlabel("")
        ax2.set_xlabel("training step")
        ax2.set_ylabel(secondary_label or secondary_key)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return _save(fig, path, dpi)


def _color_cycle(n):
    from matplotlib import rcParams

    cycle = list(rcParams["axes.prop_cycle"])
    return [cycle[i % len(cycle)] for i in range(n)]
