"""Watch the power-of-two (PO2) scales of a model while it trains: ``ScaleMonitor``.

``ScaleMonitor(every_n_steps=1)`` is a Keras callback. Every ``every_n_steps``
training batches it reads, for every PO2 weight quantizer of the model, the stored
exponent and the float tensor the quantizer sees, and computes with numpy (an
independent computation; it writes nothing, so training is unchanged):

| key | meaning |
|---|---|
| ``exponent`` | the exponent (per tensor), or the mean of the per-channel exponents |
| ``exponent_min`` / ``exponent_max`` | their range (equal to ``exponent`` per tensor) |
| ``channels`` | the number of exponents |
| ``flips`` | exponents that changed since the previous record |
| ``flip_rate`` | ``flips / channels``: the fraction of exponents that flipped |
| ``clip_fraction`` | fraction of weights with ``|round(w / s)| > qp`` (saturated at ``±qp``) |
| ``msqe`` | ``mean((w - Q(w))**2)`` over the tensor |
| ``wmsqe`` | ``sum(g (w - Q(w))**2) / sum(g)``, ``g`` the quantizer's gradient-second-moment weight |

with ``s = 2**e``, ``qp = 2**(bits-1) - 1`` and ``Q(w) = s * clip(round(w / s), -qp, qp)``
(round half to even, as the quantizers). ``clip_fraction`` is the spec's
``|w| / s > qp + 0.5`` except on exact ties ``|w| / s = qp + 0.5``, which round to
``qp + 1`` and are clipped (counted here, as the quantizer clips them). ``g`` is
``sqrt(m2)`` (``m2`` when the quantizer has ``sqrt_weight=False``): the EMA of the
squared upstream gradients that ``MSQEPo2`` and ``LearnedPo2`` (``rounding="msqe"``)
keep; without an ``m2`` variable (``MSQEPo2Baseline``, or second moments switched
off) ``wmsqe`` is NaN in the per-layer rows and the ``wmsqe`` total is omitted.
Unlike the quantizers' own objective, no outlier mask is applied: every weight counts.

The first record of a quantizer counts no flips unless the quantizer was already
initialized when training began (then it counts from that state). With
``every_n_steps > 1`` flips compare records, not steps: an exponent that flips and
flips back between two records is not seen. The measurement uses the weights after
the step's optimizer update and the exponent that step chose.

Quantizers found (``po2_quantizers(model)``):

* tfmot ``QuantizeWrapperV2`` weight quantizers that are ``TFMOTQuantizer`` /
  ``PO2KernelQuantizer`` (``quantize_model``); the tensor is the one the quantizer
  sees: the BN-folded kernel of a folded layer, the ``[kh, kw, 1, C*M]`` view of a
  depthwise kernel;
* PO2 quantizer layers (``MSQEPo2Baseline``, ``MSQEPo2``, ``LearnedPo2``) held by a
  layer as an attribute (e.g. ``self.kernel_quantizer``): the tensor is that layer's
  weight of the quantizer's built shape (named like the attribute without
  ``_quantizer`` when several fit). A quantizer layer without such a weight (e.g. on
  activations) gets exponents and flips only; its weight statistics are NaN.

Outputs: the totals of each record go into the batch ``logs`` and, at the end of
each epoch, the latest ones into the epoch logs (so ``History``, ``CSVLogger`` and
``TensorBoard`` see them): ``scale_flips`` (sum of flips), ``scale_flip_rate`` (flips
over all exponents), ``clip_fraction`` and ``msqe`` (over all quantized weights
together) and ``wmsqe`` (over the quantizers with ``m2``). ``monitor.history`` has
one row per quantizer per record (``step``, ``epoch``, ``layer``, ``quantizer``,
``bits`` and the keys above), ``monitor.totals`` one row per record;
``to_csv(path)`` and ``plot(path)`` write them.

>>> import numpy as np
>>> from keras_coherence.quantization import quantize_model
>>> inp = keras.Input((4,))
>>> model = quantize_model(keras.Model(inp, keras.layers.Dense(3, name="dense")(inp)), bits=4)
>>> model.compile("sgd", "mse")
>>> monitor = ScaleMonitor()
>>> h = model.fit(np.ones((8, 4)), np.zeros((8, 3)), batch_size=4, verbose=0, callbacks=[monitor])
>>> [(row["step"], row["layer"], row["channels"]) for row in monitor.history]
[(1, 'dense', 1), (2, 'dense', 1)]
>>> sorted(k for k in h.history if k != "loss")
['clip_fraction', 'msqe', 'scale_flip_rate', 'scale_flips', 'wmsqe']
"""
from __future__ import annotations

import csv
import math
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from keras_coherence._internals.keras_private import all_layers, build_input_shape
from keras_coherence._keras import keras, tf
from keras_coherence.quantization.base import PO2Quantizer

__all__ = ["ScaleMonitor", "TrackedQuantizer", "po2_quantizers"]

#: Columns of ``ScaleMonitor.history`` (and of ``to_csv``), in order.
COLUMNS = ("step", "epoch", "layer", "quantizer", "bits", "channels", "exponent", "exponent_min",
           "exponent_max", "flips", "flip_rate", "clip_fraction", "msqe", "wmsqe")
#: Keys of the totals (``ScaleMonitor.totals`` rows and the logs), without the prefix.
TOTALS = ("scale_flips", "scale_flip_rate", "clip_fraction", "msqe", "wmsqe")


class TrackedQuantizer:
    """One PO2 quantizer of a model (see ``po2_quantizers``).

    Attributes:
        name: the layer name (``layer/attribute`` when a layer holds several).
        quantizer: the ``PO2Quantizer`` (configuration and math).
        state: its variables by role (``exponent``, ``initialized``, optional ``m2``).
        tensor: ``() -> numpy array`` of the float tensor it quantizes (in the
            quantizer's layout), or None when unknown.
    """

    def __init__(self, name: str, quantizer: PO2Quantizer, state: Dict, tensor: Optional[Callable]):
        self.name, self.quantizer, self.state, self.tensor = name, quantizer, state, tensor

    def __repr__(self):
        return f"TrackedQuantizer({self.name!r}, {type(self.quantizer).__name__}, bits={self.quantizer.bits})"


def _short(variable):
    return variable.name.split("/")[-1].split(":")[0]


def _layer_weight(owner, attr, quantizer, exclude):
    """The weight of ``owner`` that ``quantizer`` (its attribute ``attr``) quantizes, or None."""
    shape = build_input_shape(quantizer)
    if shape is None:
        return None
    shape = tf.TensorShape(shape)
    fits = [w for w in owner.weights if id(w) not in exclude and w.shape == shape]
    base = attr[:-len("_quantizer")] if attr.endswith("_quantizer") else None
    named = [w for w in fits if _short(w) == base]
    if len(named) == 1:
        return named[0]
    return fits[0] if len(fits) == 1 else None


def _numpy(tensor_fn):
    return lambda: np.asarray(tf.convert_to_tensor(tensor_fn()).numpy(), np.float64)


def po2_quantizers(model) -> List[TrackedQuantizer]:
    """Every built PO2 weight quantizer of ``model`` (layer order), as ``TrackedQuantizer``."""
    from keras_coherence._internals.tfmot_private import weight_quantizers  # ScaleMonitor needs tfmot

    found, seen = [], set()
    layers = all_layers(model)
    for layer in layers:
        weight_vars = weight_quantizers(layer)  # a tfmot QuantizeWrapper's
        if weight_vars:
            from keras_coherence.quantization.tfmot_adapter import TFMOTQuantizer

            ours = [t for t in weight_vars if isinstance(t[1], TFMOTQuantizer)]
            for weight, tq, state in ours:
                name = layer.layer.name if len(ours) == 1 else f"{layer.layer.name}/{_short(weight)}"
                view = getattr(tq, "view", lambda w: w)
                found.append(TrackedQuantizer(name, tq.quantizer, state,
                                              _numpy(lambda view=view, weight=weight: view(weight))))
        attrs = [(k, v) for k, v in vars(layer).items()
                 if isinstance(v, PO2Quantizer) and v is not layer and v.state and id(v) not in seen]
        exclude = {id(w) for _, q in attrs for w in q.weights}
        for attr, q in attrs:
            weight = _layer_weight(layer, attr, q, exclude)
            name = layer.name if len(attrs) == 1 else f"{layer.name}/{attr}"
            found.append(TrackedQuantizer(name, q, q.state, None if weight is None else _numpy(lambda w=weight: w)))
            seen.add(id(q))
    for layer in layers:  # quantizer layers not held by another layer
        if isinstance(layer, PO2Quantizer) and layer.state and id(layer) not in seen:
            found.append(TrackedQuantizer(layer.name, layer, layer.state, None))
            seen.add(id(layer))
    names = [t.name for t in found]
    for i, t in enumerate(found):  # names key the flip counts: keep them unique
        if names.count(t.name) > 1:
            t.name = f"{t.name}#{names[:i].count(t.name)}"
    return found


class ScaleMonitor(keras.callbacks.Callback):
    """Records the PO2 exponents, their flips, the clip fraction and the MSQE of every
    PO2 weight quantizer while a model trains (see the module docstring).

    Args:
        every_n_steps: record every N training batches (and after the last one).
        prefix: prefix of the keys written to the logs.

    Raises:
        ValueError: (when training starts, or on ``record``) the model has no PO2
            quantizer.
    """

    def __init__(self, every_n_steps: int = 1, prefix: str = ""):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.history: List[Dict] = []
        self.totals: List[Dict] = []
        self._step = 0
        self._epoch = 0
        self._tracked: Optional[List[TrackedQuantizer]] = None
        self._previous: Dict[str, np.ndarray] = {}

    # ------------------------------------------------------------- discovery
    def set_model(self, model):
        super().set_model(model)
        self._tracked = None

    def quantizers(self) -> List[TrackedQuantizer]:
        """The tracked quantizers (found on first use); ``ValueError`` if there are none."""
        if self._tracked is None:
            if self.model is None:
                raise ValueError("ScaleMonitor has no model: pass it to fit(callbacks=...) or call set_model(model).")
            tracked = po2_quantizers(self.model)
            if not tracked:
                raise ValueError(
                    f"ScaleMonitor: model {self.model.name!r} has no PO2 weight quantizer. Build a QAT model "
                    "with keras_coherence.quantization.quantize_model, or quantize weights with the quantizer "
                    "layers (MSQEPo2Baseline, MSQEPo2, LearnedPo2)."
                )
            self._tracked = tracked
        return self._tracked

    # --------------------------------------------------------------- measure
    def record(self) -> Dict[str, float]:
        """Measures every quantizer now; appends the rows and returns the totals row."""
        epoch = self._epochs_done()
        flips = channels = clipped = count = 0
        sq = wsq = wsum = 0.0
        for t in self.quantizers():
            row, sums = self._measure(t)
            row = {"step": self._step, "epoch": epoch, **row}
            self.history.append(row)
            flips, channels = flips + row["flips"], channels + row["channels"]
            if sums is not None:
                clipped, count, sq = clipped + sums[0], count + sums[1], sq + sums[2]
                if sums[3] is not None:
                    wsq, wsum = wsq + sums[3], wsum + sums[4]
        totals = {"step": self._step, "epoch": epoch, "scale_flips": int(flips),
                  "scale_flip_rate": flips / channels if channels else math.nan,
                  "clip_fraction": clipped / count if count else math.nan,
                  "msqe": sq / count if count else math.nan}
        if wsum > 0:
            totals["wmsqe"] = wsq / wsum
        self.totals.append(totals)
        return totals

    def _measure(self, t: TrackedQuantizer):
        q = t.quantizer
        row = {"layer": t.name, "quantizer": type(q).__name__, "bits": q.bits}
        e = np.rint(np.asarray(t.state["exponent"].numpy(), np.float64))
        row["channels"] = int(e.size)
        if float(t.state["initialized"].numpy()) < 0.5:  # never ran: its exponent means nothing yet
            nan = math.nan
            row.update(exponent=nan, exponent_min=nan, exponent_max=nan, flips=0, flip_rate=0.0,
                       clip_fraction=nan, msqe=nan, wmsqe=nan)
            return row, None
        previous = self._previous.get(t.name)
        flips = 0 if previous is None or previous.shape != e.shape else int(np.sum(previous != e))
        self._previous[t.name] = e
        row.update(exponent=float(e.mean()), exponent_min=float(e.min()), exponent_max=float(e.max()),
                   flips=flips, flip_rate=flips / e.size)
        if t.tensor is None:
            row.update(clip_fraction=math.nan, msqe=math.nan, wmsqe=math.nan)
            return row, None
        x = t.tensor()
        s = np.ldexp(1.0, e.astype(np.int64))
        r = np.rint(x / s)
        qp = float(q.qp)
        err2 = np.square(x - s * np.clip(r, -qp, qp))
        n_clipped = int(np.sum(np.abs(r) > qp))
        row.update(clip_fraction=n_clipped / x.size, msqe=float(err2.mean()))
        wsq = wsum = None
        m2 = t.state.get("m2")
        if m2 is not None:
            g = np.broadcast_to(np.asarray(m2.numpy(), np.float64), x.shape)
            if getattr(q, "sqrt_weight", True):
                g = np.sqrt(g)
            wsq, wsum = float(np.sum(g * err2)), float(np.sum(g))
        row["wmsqe"] = wsq / wsum if wsum else math.nan
        return row, (n_clipped, x.size, float(err2.sum()), wsq, wsum)

    def _epochs_done(self):
        steps = (getattr(self, "params", None) or {}).get("steps")
        return self._step / steps if steps else float(self._epoch)

    # ----------------------------------------------------------------- hooks
    def on_train_begin(self, logs=None):
        if self.model.built:
            for t in self.quantizers():  # the state training starts from, if there is one
                if float(t.state["initialized"].numpy()) >= 0.5:
                    self._previous[t.name] = np.rint(np.asarray(t.state["exponent"].numpy(), np.float64))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            totals = self.record()
            if logs is not None:
                logs.update(self._log_items(totals))

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if logs is not None and self.totals:
            logs.update(self._log_items(self.totals[-1]))

    def on_train_end(self, logs=None):
        if self._tracked is not None and (not self.totals or self.totals[-1]["step"] != self._step):
            self.record()  # always end on the final state

    def _log_items(self, totals):
        return {self.prefix + k: totals[k] for k in TOTALS if k in totals}

    # ---------------------------------------------------------------- output
    def to_csv(self, path: str) -> str:
        """Writes ``history`` (one row per quantizer per record) to ``path``; returns it."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        return path

    def plot(self, path: str, title: Optional[str] = None, dpi: int = 100) -> str:
        """Saves a figure of ``history`` to ``path``: each quantizer's exponent vs step
        (per-channel: the mean, with the min..max range shaded) and its flip rate
        (with the model's ``scale_flip_rate`` in black). Returns ``path``."""
        return plot_scales(self.history, path, totals=self.totals, title=title, dpi=dpi)


def plot_scales(rows, path: str, totals=None, title: Optional[str] = None, dpi: int = 100) -> str:
    """The ``ScaleMonitor.plot`` figure from history rows (e.g. read back from its CSV)."""
    from matplotlib.figure import Figure

    from keras_coherence.plots import _save

    rows = list(rows)
    if not rows:
        raise ValueError("no ScaleMonitor records to plot: train with the monitor attached first.")
    layers: Dict[str, List[Dict]] = {}
    for row in rows:
        layers.setdefault(str(row["layer"]), []).append(row)
    fig = Figure(figsize=(8.0, 6.0))
    ax_e, ax_f = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for i, (name, lrows) in enumerate(layers.items()):
        color = f"C{i % 10}"
        steps = [float(r["step"]) for r in lrows]
        marker = "o" if len(steps) <= 30 else None
        ax_e.plot(steps, [float(r["exponent"]) for r in lrows], color=color, marker=marker, markersize=3,
                  drawstyle="steps-post", label=name)
        lo, hi = [float(r["exponent_min"]) for r in lrows], [float(r["exponent_max"]) for r in lrows]
        if lo != hi:
            ax_e.fill_between(steps, lo, hi, step="post", color=color, alpha=0.15)
        ax_f.plot(steps, [float(r["flip_rate"]) for r in lrows], color=color, marker=marker, markersize=3,
                  linewidth=1.0)
    if totals:
        ax_f.plot([float(r["step"]) for r in totals], [float(r["scale_flip_rate"]) for r in totals],
                  color="black", linewidth=2.0, label="all exponents")
        ax_f.legend(fontsize="small", loc="upper right")
    ax_e.set_ylabel("exponent e (scale 2^e)")
    ax_e.grid(True, alpha=0.3)
    ax_e.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax_f.set_ylabel("flip rate")
    ax_f.set_xlabel("training step")
    rates = [float(r["flip_rate"]) for r in rows if math.isfinite(float(r["flip_rate"]))]
    ax_f.set_ylim(-0.002, max(0.05, 1.1 * max(rates, default=0.0)))
    ax_f.grid(True, alpha=0.3)
    ax_e.set_title(title if title is not None else "PO2 weight scales during training")
    fig.tight_layout()
    return _save(fig, path, dpi)
