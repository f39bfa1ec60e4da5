"""Train with a robust gradient aggregator (winsorized, M3, RM3, RA3 or plain SGD),
optionally on noisy labels, tracking after every epoch the accuracy on the pristine and
corrupt training examples and on the test set.

>>> from keras_coherence.workflows import aggregate
>>> config = aggregate.Config(aggregator="rm3", label_noise=0.5, max_train=300, epochs=2)
>>> summary = aggregate.run(config, "runs/aggregate")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional

import numpy as np

from keras_coherence.workflows import _common as c

__all__ = ["Config", "parse_aggregator", "run"]

HELP = "train with a robust gradient aggregator (winsorized, M3, RM3, ...) and track memorization of noisy labels"


@dataclasses.dataclass
class Config(c.TrainingOptions):
    """Train a model whose update direction comes from a robust aggregator -- winsorized
    per-example gradients, the median of group means (M3), the running median of the
    last steps' gradients (RM3) or its running-average control (RA3) -- or plain SGD.
    With --label-noise, it tracks after every epoch how well the model fits the
    corrupt training examples' noisy labels (memorization), the pristine ones and the
    test set. Writes aggregate.csv, aggregate.png and summary.json to --out."""

    aggregator: str = c.option(
        "winsorized:c=4", "how the update direction is formed: 'sgd' (= 'mean'), 'winsorized:c=C' "
        "(or 'winsorized:percentile=P'), 'm3' (or 'm3:groups=G'), 'rm3' / 'ra3' (running median / average of "
        "the last 3 steps; 'rm5', 'ra5', ... for other windows). Winsorized forms per-example gradients and "
        "is much slower than the others", metavar="SPEC")
    report_coherence: bool = c.option(
        False, "also log the m-coherence of every training batch (epoch mean in the CSV)")


def parse_aggregator(spec: str, batch_size: int, num_train: Optional[int] = None):
    """The :class:`~keras_coherence.aggregation.arms.Arm` of ``spec``, checked against the
    batch size (and the last batch of ``num_train``); ConfigError naming ``--aggregator``."""
    from keras_coherence.aggregation.arms import check_arm, parse_arm

    try:
        arm = parse_arm(spec)
        check_arm(arm, batch_size, num_train)
    except (ValueError, TypeError) as err:
        message = str(err).rstrip(".")
        if spec not in message:
            message = f"{message} (in {spec!r})"
        hint = "" if "known:" in message or "e.g." in message or "batch" in message else \
            "; e.g. sgd, winsorized:c=4, m3, rm3, ra3"
        raise c.ConfigError(f"--aggregator: {message}{hint}.") from None
    return arm


def run(config: Config, out_dir: str, log: Callable[[str], None] = print) -> c.Summary:
    """Train ``config.model`` on ``config.dataset`` (with ``config.label_noise`` of its
    labels corrupted) using the aggregator ``config.aggregator``; after every epoch record
    the accuracy on the pristine training examples, on the corrupt ones (against their
    noisy labels and their true labels) and on the test set. Writes ``aggregate.csv``,
    ``aggregate.png`` and ``summary.json`` to ``out_dir``; returns the summary. Raises
    :class:`ConfigError` for a bad aggregator, dataset or model."""
    from keras_coherence._keras import keras
    from keras_coherence.aggregation.arms import build_arm_model
    from keras_coherence.callbacks import SubsetAccuracy
    from keras_coherence.workflows.experiments import plot_run, write_csv

    start = time.perf_counter()
    parse_aggregator(config.aggregator, config.batch_size)  # fail before loading any data
    keras.utils.set_random_seed(config.seed)
    (x_train, y_train), (x_test, y_test), num_classes, input_shape = c.load_data(config)
    n = len(x_train)
    arm = parse_aggregator(config.aggregator, config.batch_size, n)
    y_fit, corrupt = c.noisy_labels(config, y_train, num_classes)

    base = c.build_float_model(config, input_shape, num_classes)
    model = build_arm_model(arm, base, config.lr, report_coherence=config.report_coherence)
    subsets = {"pristine": (x_train[~corrupt], y_fit[~corrupt])}
    if corrupt.any():
        x_corrupt = x_train[corrupt]
        subsets["corrupt"] = (x_corrupt, y_fit[corrupt])
        subsets["corrupt_true"] = (x_corrupt, y_train[corrupt])
    subsets["test"] = (x_test, y_test)
    tracker = SubsetAccuracy(subsets, add_to_logs=not config.quiet)

    steps_per_epoch = math.ceil(n / config.batch_size)
    log(f"aggregate: {arm.label} ({arm.spec}); "
        + c.sgd_run_text(config, model, n, steps_per_epoch * config.epochs))
    train_seconds = c.fit_seconds(model, x_train, y_fit, config, tracker)

    rows = tracker.rows
    os.makedirs(out_dir, exist_ok=True)
    columns = ["epoch", "step", "seconds", "pristine_accuracy"]
    if corrupt.any():
        columns += ["corrupt_accuracy", "corrupt_true_accuracy"]
    columns += ["test_accuracy", "loss", "train_accuracy"]
    if config.report_coherence:
        columns += ["m_coherence", "alpha"]
    write_csv(os.path.join(out_dir, "aggregate.csv"), rows, columns)
    title = (f"{arm.label}: {config.model} on {config.dataset}"
             + (f", {config.label_noise:.0%} label noise" if config.label_noise else ""))
    png_path = plot_run(rows, os.path.join(out_dir, "aggregate.png"), title=title,
                        chance=1.0 / num_classes if corrupt.any() else None)

    def value(row, key):
        v = row.get(key)
        return None if v is None or not math.isfinite(v) else float(v)

    last = rows[-1]
    trained = rows[1:]
    final = {"epoch": int(last["epoch"]), "pristine": value(last, "pristine_accuracy"),
             "corrupt": value(last, "corrupt_accuracy"), "corrupt_true": value(last, "corrupt_true_accuracy"),
             "test": value(last, "test_accuracy")}
    best_test = max(trained, key=lambda r: value(r, "test_accuracy") or -1.0)
    summary = c.Summary({
        "command": "aggregate",
        "config": c.config_dict(config),
        "aggregator": {"spec": arm.spec, "label": arm.label, "kind": arm.kind},
        "data": {"dataset": config.dataset, "num_train": n, "num_test": int(len(x_test)),
                 "num_classes": num_classes, "input_shape": list(input_shape),
                 "num_corrupted_labels": int(corrupt.sum())},
        "model": {"name": config.model, "parameters": int(model.count_params())},
        "training": {"epochs": config.epochs, "steps": steps_per_epoch * config.epochs,
                     "steps_per_epoch": steps_per_epoch,
                     "seconds_per_epoch": tracker.steady_seconds_per_epoch()},
        "accuracy": {
            "final": final,
            "best_test": {"epoch": int(best_test["epoch"]), "value": value(best_test, "test_accuracy")},
            "max_corrupt": None if not corrupt.any() else {
                "epoch": int(max(trained, key=lambda r: r["corrupt_accuracy"])["epoch"]),
                "value": float(max(r["corrupt_accuracy"] for r in trained))},
        },
        "m_coherence": None,
        "wall_seconds": {"total": time.perf_counter() - start, "training": train_seconds},
        "files": {"csv": "aggregate.csv", "plot": os.path.basename(png_path), "summary": "summary.json"},
    })
    if config.report_coherence:
        values = [r["m_coherence"] for r in trained]
        summary["m_coherence"] = {"first_epoch": float(values[0]), "last_epoch": float(values[-1]),
                                  "peak": float(max(values)),
                                  "peak_epoch": int(trained[int(np.argmax(values))]["epoch"])}
    summary.write(out_dir)

    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    parts = [f"pristine {fmt(final['pristine'])}"]
    if corrupt.any():
        parts.append(f"corrupt {fmt(final['corrupt'])} on their noisy labels "
                     f"({fmt(final['corrupt_true'])} on their true labels)")
    parts.append(f"test {fmt(final['test'])} (best {fmt(summary['accuracy']['best_test']['value'])} "
                 f"at epoch {summary['accuracy']['best_test']['epoch']})")
    log(f"  final accuracy: {', '.join(parts)}")
    if summary["m_coherence"]:
        mc = summary["m_coherence"]
        log(f"  batch m-coherence (epoch means): first {mc['first_epoch']:.3g}, peak {mc['peak']:.3g} "
            f"(epoch {mc['peak_epoch']}), last {mc['last_epoch']:.3g}")
    per_epoch = f"{summary['training']['seconds_per_epoch']:.2f} s per epoch" + (
        " after the first" if config.epochs > 1 else "")
    log(f"  {summary['wall_seconds']['total']:.1f} s ({per_epoch}); wrote "
        f"{os.path.join(out_dir, '')}{{aggregate.csv, aggregate.png, summary.json}}")
    return summary
