"""Train with SGD while :class:`~keras_coherence.callbacks.CoherenceMonitor` measures
the m-coherence of a fixed probe sample of training examples.

>>> from keras_coherence.workflows import coherence
>>> summary = coherence.run(coherence.Config(epochs=1, max_train=200), "runs/coherence")  # doctest: +SKIP
>>> summary["m_coherence"]["last"]["value"]  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional

import numpy as np

from keras_coherence.workflows import _common as c

__all__ = ["Config", "run"]

HELP = "train with SGD and log the m-coherence of a fixed probe sample"
AUTO_MEASUREMENTS = 50  # every_n_steps=None: about this many measurements per run


@dataclasses.dataclass
class Config(c.TrainingOptions):
    """Train a model with plain SGD while CoherenceMonitor measures the m-coherence
    ||sum_i g_i||^2 / sum_i ||g_i||^2 of a fixed probe sample of training examples.
    Writes coherence.csv, coherence.png and summary.json to --out."""

    probe_size: int = c.option(512, "size of the fixed probe sample of training examples (with the training "
                               "labels, noisy ones included) on which m-coherence is measured",
                               check=c.positive_int, metavar="M")
    every_n_steps: Optional[int] = c.option(
        None, f"measure every N training steps (default: about {AUTO_MEASUREMENTS} measurements over the "
        "run); always also at the start and the end", check=c.positive_int, metavar="N")
    per_layer: bool = c.option(True, "also measure each layer's m-coherence")
    log_dir: Optional[str] = c.option(None, "also write TensorBoard scalars here")


def run(config: Config, out_dir: str, log: Callable[[str], None] = print) -> c.Summary:
    """Train ``config.model`` on ``config.dataset`` with SGD and measure m-coherence on a
    fixed probe sample; write ``coherence.csv``, ``coherence.png`` and ``summary.json``
    to ``out_dir``; return the summary. Raises :class:`ConfigError` for a bad dataset or
    model."""
    from keras_coherence._keras import keras
    from keras_coherence.callbacks import CoherenceMonitor
    from keras_coherence.plots import plot_coherence

    start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    (x_train, y_train), (x_test, y_test), num_classes, input_shape = c.load_data(config)
    n = len(x_train)
    y_fit, corrupt = c.noisy_labels(config, y_train, num_classes)

    probe_size = min(config.probe_size, n)
    if probe_size < config.probe_size:
        log(f"note: --probe-size {config.probe_size} > {n} training examples; probing all {n}.")
    probe = np.sort(np.random.default_rng(config.seed).choice(n, size=probe_size, replace=False))
    x_probe, y_probe = x_train[probe], y_fit[probe]  # the labels the model is trained on

    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    every = config.every_n_steps or max(1, round(total_steps / AUTO_MEASUREMENTS))

    model = c.build_float_model(config, input_shape, num_classes)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=config.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "coherence.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)
    monitor = CoherenceMonitor(x_probe, y_probe, every_n_steps=every, per_layer=config.per_layer,
                               csv_path=csv_path, log_dir=config.log_dir)
    log(f"coherence: {c.sgd_run_text(config, model, n, total_steps)}; m-coherence of a {probe_size}-example "
        f"probe every {every} steps")
    train_seconds = c.fit_seconds(model, x_train, y_fit, config, monitor)

    rows = monitor.history
    _, train_acc = model.evaluate(x_train, y_fit, batch_size=1024, verbose=0)
    test_acc = None  # a dataset without test examples
    if len(x_test):
        _, test_acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    clean_acc = None
    if corrupt.any():
        _, clean_acc = model.evaluate(x_train, y_train, batch_size=1024, verbose=0)

    title = f"{config.model} on {config.dataset}" + (
        f", {config.label_noise:.0%} label noise" if config.label_noise else "")
    png_path = plot_coherence(rows, os.path.join(out_dir, "coherence.png"),
                              title=f"m-coherence of a {probe_size}-example probe: {title}",
                              per_layer=config.per_layer)

    values = [r["m_coherence"] for r in rows]
    peak = int(np.nanargmax(values))
    point = lambda r: {"step": int(r["step"]), "epoch": int(r["epoch"]), "value": float(r["m_coherence"])}  # noqa: E731
    summary = c.Summary({
        "command": "coherence",
        "config": c.config_dict(config),
        "data": {"dataset": config.dataset, "num_train": n, "num_test": int(len(x_test)),
                 "num_classes": num_classes, "input_shape": list(input_shape),
                 "num_corrupted_labels": int(corrupt.sum()), "probe_size": int(probe_size)},
        "model": {"name": config.model, "parameters": int(model.count_params())},
        "training": {"steps": total_steps, "steps_per_epoch": steps_per_epoch, "every_n_steps": every},
        "accuracy": {"train": float(train_acc), "test": None if test_acc is None else float(test_acc),
                     "train_clean_labels": None if clean_acc is None else float(clean_acc)},
        "m_coherence": {"first": point(rows[0]), "peak": point(rows[peak]),
                        "last": point(rows[-1]), "measurements": len(rows)},
        "wall_seconds": {"total": time.perf_counter() - start, "training": train_seconds},
        "files": {"csv": "coherence.csv", "plot": os.path.basename(png_path), "summary": "summary.json"},
    })
    summary.write(out_dir)

    mc = summary["m_coherence"]
    accs = f"train accuracy {train_acc:.3f}" + (
        f" ({clean_acc:.3f} on the clean labels)" if clean_acc is not None else "")
    log(f"  {accs}, test accuracy " + ("n/a" if test_acc is None else f"{test_acc:.3f}"))
    log(f"  m-coherence: first {mc['first']['value']:.3g} (step 0), peak "
        f"{mc['peak']['value']:.3g} (step {mc['peak']['step']}), last {mc['last']['value']:.3g} "
        f"(step {mc['last']['step']}); orthogonal gradients give 1, identical ones {probe_size}")
    log(f"  {summary['wall_seconds']['total']:.1f} s; wrote {os.path.join(out_dir, '')}"
        "{coherence.csv, coherence.png, summary.json}")
    return summary
