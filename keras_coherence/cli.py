"""Command-line interface: ``keras-coherence`` / ``python -m keras_coherence``.

Subcommands:

* ``coherence`` -- train a model with SGD while a
  :class:`~keras_coherence.callbacks.CoherenceMonitor` measures the m-coherence of a
  fixed probe sample of training examples; writes ``coherence.csv``,
  ``coherence.png`` and ``summary.json``.
* ``aggregate`` -- train with a robust gradient aggregator (winsorized, M3, RM3,
  RA3 or plain SGD), optionally on noisy labels, tracking the accuracy on the
  pristine and corrupt training examples and the test set after every epoch; writes
  ``aggregate.csv``, ``aggregate.png`` and ``summary.json``.
* ``quantize`` -- train in float, then quantization-aware with power-of-two (PO2)
  weight quantizers while a :class:`~keras_coherence.quantization.ScaleMonitor`
  records the scales; export an integer TFLite model and compare the float,
  quantized (Keras) and TFLite test accuracy; writes ``quantize.csv``,
  ``quantize.png``, ``model.tflite`` and ``summary.json``.
* ``bnn`` -- train a binary network standard or with low memory
  (:func:`~keras_coherence.binary.training.train_bnn`), compare its modelled training
  memory with standard training, export it for Larq Compute Engine inference and as a
  builtin-only on-device training model, and run a few training steps of that in LiteRT;
  writes ``summary.json``, ``memory.csv``, the ``.tflite`` files and ``.npz`` data for
  ``python -m edge train``.
* ``demo`` -- short versions of the jobs above (what ``make demo`` runs).

Run ``keras-coherence COMMAND --help`` for the options of one subcommand.

Adding a subcommand is one decorated function::

    @subcommand("name", help="one line", arguments=[*TRAINING_ARGS, arg("--x", type=int)])
    def name_command(args):
        ...           # args is the parsed argparse.Namespace
        return 0      # exit status

Raise :class:`UsageError` for problems the user can fix with other arguments: it
prints one line and exits with status 2. A demo section is one function registered
with :func:`demo_section`.
"""
from __future__ import annotations

import os

# Quiet TensorFlow's C++ logging when nothing imported TensorFlow yet (e.g.
# ``python -c "from keras_coherence.cli import main"`` in a fresh process). When the
# package was imported first -- ``python -m keras_coherence`` and the console script
# always do -- TensorFlow has already read it; main() then silences the one noisy
# device-initialisation step instead (see _quiet_device_init).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402
from keras_coherence._output import OutputDirError, staged_output  # noqa: E402

__all__ = ["UsageError", "arg", "demo_section", "main", "run_aggregate", "run_bnn", "run_coherence",
           "run_quantize", "subcommand"]

PROG = "keras-coherence"
_AUTO_MEASUREMENTS = 50  # --every-n-steps auto: about this many measurements per run


class UsageError(Exception):
    """A problem with the command-line arguments (printed as one line, exit status 2)."""


# --------------------------------------------------------------------------------------
# Subcommand registry
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Subcommand:
    name: str
    help: str
    description: Optional[str]
    arguments: Sequence[Tuple[tuple, dict]]
    run: Callable[[argparse.Namespace], int]


_SUBCOMMANDS: Dict[str, _Subcommand] = {}


def arg(*flags, **kwargs) -> Tuple[tuple, dict]:
    """One argument spec for :func:`subcommand`: the arguments of ``add_argument``."""
    return flags, kwargs


def subcommand(name: str, help: str, arguments: Sequence[Tuple[tuple, dict]] = (),
               description: Optional[str] = None):
    """Register the decorated function ``run(args) -> exit status`` as a subcommand."""
    def register(run):
        if name in _SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        _SUBCOMMANDS[name] = _Subcommand(name, help, description or run.__doc__, list(arguments), run)
        return run
    return register


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except for options whose default is None or False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (plus a pointer to --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argparse parser with every registered subcommand."""
    from keras_coherence import __version__

    parser = _Parser(
        prog=prog,
        description="Gradient coherence for TensorFlow / Keras 2: measure how aligned "
                    "per-example gradients are while a network trains.",
        epilog=f"Run '{prog} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in _SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                           formatter_class=_HelpFormatter)
        for flags, kwargs in cmd.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(_run=cmd.run)
    return parser


# --------------------------------------------------------------------------------------
# Argument types (errors become one-line usage errors)
# --------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a fraction in [0, 1] (e.g. 0.25 for 25% of the labels)")
    return value


def _widths(text):
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be comma-separated layer widths, e.g. 512,512") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be comma-separated positive layer widths, e.g. 512,512")
    return values


#: Options shared by every subcommand that trains a model.
TRAINING_ARGS = [
    arg("--dataset", default="embedded_mnist",
        help="'embedded_mnist' (offline, 4000 train / 1000 test) or any tensorflow_datasets "
             "name already prepared under --data-dir"),
    arg("--data-dir", default=None, help="tensorflow_datasets data directory"),
    arg("--model", default="mlp", choices=("mlp", "cnn"), help="model architecture"),
    arg("--hidden", type=_widths, default=None, metavar="W1,W2,..",
        help="hidden widths of the mlp (default 512,512)"),
    arg("--epochs", type=_positive_int, default=5, help="training epochs"),
    arg("--batch-size", type=_positive_int, default=100, help="SGD mini-batch size"),
    arg("--lr", type=_positive_float, default=0.1, help="SGD learning rate (no momentum)"),
    arg("--label-noise", type=_fraction, default=0.0, metavar="FRACTION",
        help="fraction of training labels to corrupt (keras_coherence.data.corrupt_labels)"),
    arg("--noise-mode", default="uniform", choices=("uniform", "random", "permute"),
        help="how corrupted labels are drawn (see corrupt_labels)"),
    arg("--max-train", type=_positive_int, default=None, metavar="N",
        help="use at most N training examples"),
    arg("--seed", type=int, default=0, help="seed of weights, shuffling, label noise, probe"),
    arg("--quiet", action="store_true", help="no progress bar"),
]

COHERENCE_ARGS = [
    arg("--probe-size", type=_positive_int, default=512, metavar="M",
        help="size of the fixed probe sample of training examples (with the training "
             "labels, noisy ones included) on which m-coherence is measured"),
    arg("--every-n-steps", type=_positive_int, default=None, metavar="N",
        help=f"measure every N training steps (default: about {_AUTO_MEASUREMENTS} "
             "measurements over the run); always also at the start and the end"),
    arg("--per-layer", action=argparse.BooleanOptionalAction, default=True,
        help="also measure each layer's m-coherence"),
    arg("--log-dir", default=None, help="also write TensorBoard scalars here"),
]


# --------------------------------------------------------------------------------------
# The coherence job
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_device_init():
    """Send native stderr to /dev/null while TensorFlow first enumerates devices.

    On machines without a GPU, TensorFlow 2.21 logs a harmless ``failed call to
    cuInit`` error there, which ``TF_CPP_MIN_LOG_LEVEL`` can no longer hide once
    TensorFlow is imported. Skipped when the user set ``TF_CPP_MIN_LOG_LEVEL`` to 0/1.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") in ("0", "1"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _load_data(args):
    """Train/test arrays, num_classes and input shape; bad names -> UsageError."""
    from keras_coherence import data

    try:
        x_train, y_train = data.load_dataset(args.dataset, split="train", data_dir=args.data_dir,
                                             max_examples=args.max_train)
        x_test, y_test = data.load_dataset(args.dataset, split="test", data_dir=args.data_dir)
        info = data.dataset_info(args.dataset, data_dir=args.data_dir)
    except data.DatasetNotAvailableError as err:
        raise UsageError(f"--dataset {args.dataset}: {err} (On the command line: "
                         "--data-dir DIR.)") from err
    except (ValueError, ImportError) as err:
        raise UsageError(f"--dataset {args.dataset}: {err}") from err
    if len(x_train) == 0:
        raise UsageError(f"--dataset {args.dataset}: the training split is empty.")
    num_classes = info.get("num_classes") or int(max(y_train.max(), y_test.max(initial=0)) + 1)
    return (x_train, y_train), (x_test, y_test), int(num_classes), tuple(x_train.shape[1:])


def _epochs(n):
    """``"1 epoch"`` / ``"3 epochs"``."""
    return f"{n} epoch{'s' if n != 1 else ''}"


def _noise_note(args):
    """``", 50% label noise (uniform)"`` when the run corrupts labels, else ``""``."""
    return f", {args.label_noise:.0%} label noise ({args.noise_mode})" if args.label_noise else ""


def _hidden_kwargs(args):
    """``{"hidden": ...}`` for an MLP when ``--hidden`` is given; refused for other models."""
    if args.hidden is None:
        return {}
    if args.model != "mlp":
        raise UsageError("--hidden only applies to --model mlp.")
    return {"hidden": args.hidden}


def _build(args, input_shape, num_classes):
    from keras_coherence import models

    kwargs = _hidden_kwargs(args)
    try:
        return models.build_model(args.model, input_shape, num_classes, **kwargs)
    except ValueError as err:
        raise UsageError(f"--model {args.model}: {err}") from err


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def run_coherence(args: argparse.Namespace, out_dir: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``args.model`` on ``args.dataset`` with SGD and measure m-coherence on a
    fixed probe sample; write ``coherence.csv``, ``coherence.png`` and
    ``summary.json`` to ``out_dir``; return the summary dict.

    ``args`` holds the ``coherence`` subcommand's options (``TRAINING_ARGS`` and
    ``COHERENCE_ARGS``). Raises :class:`UsageError` for a bad dataset or model.
    """
    from keras_coherence._keras import keras
    from keras_coherence.callbacks import CoherenceMonitor
    from keras_coherence.plots import plot_coherence

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test), num_classes, input_shape = _load_data(args)
    n = len(x_train)

    y_fit, corrupt = _noise(args, y_train, num_classes)

    probe_size = min(args.probe_size, n)
    if probe_size < args.probe_size:
        log(f"note: --probe-size {args.probe_size} > {n} training examples; probing all {n}.")
    probe = np.sort(np.random.default_rng(args.seed).choice(n, size=probe_size, replace=False))
    x_probe, y_probe = x_train[probe], y_fit[probe]  # the labels the model is trained on

    steps_per_epoch = math.ceil(n / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    every = args.every_n_steps or max(1, round(total_steps / _AUTO_MEASUREMENTS))

    model = _build(args, input_shape, num_classes)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=args.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "coherence.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)
    monitor = CoherenceMonitor(x_probe, y_probe, every_n_steps=every, per_layer=args.per_layer,
                               csv_path=csv_path, log_dir=args.log_dir)
    log(f"coherence: {args.model} ({model.count_params():,} parameters) on {args.dataset}, "
        f"{n} training examples{_noise_note(args)}; SGD lr {args.lr}, batch {args.batch_size}, "
        f"{_epochs(args.epochs)} = {total_steps} steps; "
        f"m-coherence of a {probe_size}-example "
        f"probe every {every} steps")
    train_start = time.perf_counter()
    model.fit(x_train, y_fit, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              callbacks=[monitor], verbose=0 if args.quiet else 1)
    train_seconds = time.perf_counter() - train_start

    rows = monitor.history
    _, train_acc = model.evaluate(x_train, y_fit, batch_size=1024, verbose=0)
    test_acc = None  # a dataset without test examples
    if len(x_test):
        _, test_acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    clean_acc = None
    if corrupt.any():
        _, clean_acc = model.evaluate(x_train, y_train, batch_size=1024, verbose=0)

    title = f"{args.model} on {args.dataset}" + (f", {args.label_noise:.0%} label noise" if args.label_noise else "")
    png_path = plot_coherence(rows, os.path.join(out_dir, "coherence.png"),
                              title=f"m-coherence of a {probe_size}-example probe: {title}",
                              per_layer=args.per_layer)

    values = [r["m_coherence"] for r in rows]
    peak = int(np.nanargmax(values))
    point = lambda r: {"step": int(r["step"]), "epoch": int(r["epoch"]), "value": float(r["m_coherence"])}  # noqa: E731
    summary = {
        "command": "coherence",
        "config": {k: _jsonable(v) for k, v in sorted(vars(args).items()) if not k.startswith("_")},
        "data": {
            "dataset": args.dataset, "num_train": n, "num_test": int(len(x_test)),
            "num_classes": num_classes, "input_shape": list(input_shape),
            "num_corrupted_labels": int(corrupt.sum()), "probe_size": int(probe_size),
        },
        "model": {"name": args.model, "parameters": int(model.count_params())},
        "training": {"steps": total_steps, "steps_per_epoch": steps_per_epoch,
                     "every_n_steps": every},
        "accuracy": {"train": float(train_acc), "test": None if test_acc is None else float(test_acc),
                     "train_clean_labels": None if clean_acc is None else float(clean_acc)},
        "m_coherence": {"first": point(rows[0]), "peak": point(rows[peak]),
                        "last": point(rows[-1]), "measurements": len(rows)},
        "wall_seconds": {"total": time.perf_counter() - start, "training": train_seconds},
        "files": {"csv": "coherence.csv", "plot": os.path.basename(png_path),
                  "summary": "summary.json"},
    }
    _write_summary(out_dir, summary)

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


@subcommand(
    "coherence",
    help="train with SGD and log the m-coherence of a fixed probe sample",
    arguments=[*TRAINING_ARGS, *COHERENCE_ARGS,
               arg("--out", default=os.path.join("runs", "coherence"), metavar="DIR",
                   help="output directory")],
)
def coherence_command(args):
    """Train a model with plain SGD while CoherenceMonitor measures the m-coherence
    ||sum_i g_i||^2 / sum_i ||g_i||^2 of a fixed probe sample of training examples.
    Writes coherence.csv, coherence.png and summary.json to --out."""
    _run_staged(run_coherence, args)
    return 0


# --------------------------------------------------------------------------------------
# The aggregate job
# --------------------------------------------------------------------------------------

AGGREGATE_ARGS = [
    arg("--aggregator", default="winsorized:c=4", metavar="SPEC",
        help="how the update direction is formed: 'sgd' (= 'mean'), 'winsorized:c=C' "
             "(or 'winsorized:percentile=P'), 'm3' (or 'm3:groups=G'), 'rm3' / 'ra3' "
             "(running median / average of the last 3 steps; 'rm5', 'ra5', ... for other "
             "windows). Winsorized forms per-example gradients and is much slower than the others"),
    arg("--report-coherence", action="store_true",
        help="also log the m-coherence of every training batch (epoch mean in the CSV)"),
]


def _noise(args, y_train, num_classes):
    from keras_coherence import data

    if args.label_noise <= 0:
        return y_train, np.zeros(len(y_train), bool)
    try:
        return data.corrupt_labels(y_train, args.label_noise, num_classes=num_classes,
                                   seed=args.seed, mode=args.noise_mode)
    except ValueError as err:
        raise UsageError(f"--label-noise {args.label_noise}: {err}") from err


def _parse_aggregator(spec: str, batch_size: int, num_train: Optional[int] = None):
    """The :class:`~keras_coherence.experiments.Arm` of ``--aggregator``; UsageError if bad."""
    from keras_coherence import experiments

    try:
        arm = experiments.parse_arm(spec)
        experiments.check_arm(arm, batch_size, num_train)
    except (ValueError, TypeError) as err:
        message = str(err).rstrip(".")
        if spec not in message:
            message = f"{message} (in {spec!r})"
        hint = "" if "known:" in message or "e.g." in message or "batch" in message else \
            "; e.g. sgd, winsorized:c=4, m3, rm3, ra3"
        raise UsageError(f"--aggregator: {message}{hint}.") from None
    return arm


def run_aggregate(args: argparse.Namespace, out_dir: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``args.model`` on ``args.dataset`` (with ``args.label_noise`` of its labels
    corrupted) using the aggregator ``args.aggregator``; after every epoch record the
    accuracy on the pristine training examples, on the corrupt ones (against their
    noisy labels and their true labels) and on the test set. Writes
    ``aggregate.csv``, ``aggregate.png`` and ``summary.json`` to ``out_dir``; returns
    the summary dict.

    ``args`` holds the ``aggregate`` subcommand's options (``TRAINING_ARGS`` and
    ``AGGREGATE_ARGS``). Raises :class:`UsageError` for a bad aggregator, dataset or model.
    """
    from keras_coherence import experiments
    from keras_coherence._keras import keras

    start = time.perf_counter()
    _parse_aggregator(args.aggregator, args.batch_size)  # fail before loading any data
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test), num_classes, input_shape = _load_data(args)
    n = len(x_train)
    arm = _parse_aggregator(args.aggregator, args.batch_size, n)
    y_fit, corrupt = _noise(args, y_train, num_classes)

    base = _build(args, input_shape, num_classes)
    model = experiments.build_arm_model(arm, base, args.lr, report_coherence=args.report_coherence)
    subsets = {"pristine": (x_train[~corrupt], y_fit[~corrupt])}
    if corrupt.any():
        x_corrupt = x_train[corrupt]
        subsets["corrupt"] = (x_corrupt, y_fit[corrupt])
        subsets["corrupt_true"] = (x_corrupt, y_train[corrupt])
    subsets["test"] = (x_test, y_test)
    tracker = experiments.SubsetAccuracy(subsets, add_to_logs=not args.quiet)

    steps_per_epoch = math.ceil(n / args.batch_size)
    log(f"aggregate: {arm.label} ({arm.spec}); {args.model} ({model.count_params():,} parameters) on "
        f"{args.dataset}, {n} training examples{_noise_note(args)}; SGD lr {args.lr}, batch {args.batch_size}, "
        f"{_epochs(args.epochs)} = {steps_per_epoch * args.epochs} steps")
    train_start = time.perf_counter()
    model.fit(x_train, y_fit, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              callbacks=[tracker], verbose=0 if args.quiet else 1)
    train_seconds = time.perf_counter() - train_start

    rows = tracker.rows
    os.makedirs(out_dir, exist_ok=True)
    columns = ["epoch", "step", "seconds", "pristine_accuracy"]
    if corrupt.any():
        columns += ["corrupt_accuracy", "corrupt_true_accuracy"]
    columns += ["test_accuracy", "loss", "train_accuracy"]
    if args.report_coherence:
        columns += ["m_coherence", "alpha"]
    experiments.write_csv(os.path.join(out_dir, "aggregate.csv"), rows, columns)
    title = (f"{arm.label}: {args.model} on {args.dataset}"
             + (f", {args.label_noise:.0%} label noise" if args.label_noise else ""))
    png_path = experiments.plot_run(rows, os.path.join(out_dir, "aggregate.png"), title=title,
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
    summary = {
        "command": "aggregate",
        "config": {k: _jsonable(v) for k, v in sorted(vars(args).items()) if not k.startswith("_")},
        "aggregator": {"spec": arm.spec, "label": arm.label, "kind": arm.kind},
        "data": {
            "dataset": args.dataset, "num_train": n, "num_test": int(len(x_test)),
            "num_classes": num_classes, "input_shape": list(input_shape),
            "num_corrupted_labels": int(corrupt.sum()),
        },
        "model": {"name": args.model, "parameters": int(model.count_params())},
        "training": {"epochs": args.epochs, "steps": steps_per_epoch * args.epochs,
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
    }
    if args.report_coherence:
        values = [r["m_coherence"] for r in trained]
        summary["m_coherence"] = {"first_epoch": float(values[0]), "last_epoch": float(values[-1]),
                                  "peak": float(max(values)),
                                  "peak_epoch": int(trained[int(np.argmax(values))]["epoch"])}
    _write_summary(out_dir, summary)

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
        " after the first" if args.epochs > 1 else "")
    log(f"  {summary['wall_seconds']['total']:.1f} s ({per_epoch}); wrote "
        f"{os.path.join(out_dir, '')}{{aggregate.csv, aggregate.png, summary.json}}")
    return summary


@subcommand(
    "aggregate",
    help="train with a robust gradient aggregator (winsorized, M3, RM3, ...) and track "
         "memorization of noisy labels",
    arguments=[*TRAINING_ARGS, *AGGREGATE_ARGS,
               arg("--out", default=os.path.join("runs", "aggregate"), metavar="DIR",
                   help="output directory")],
)
def aggregate_command(args):
    """Train a model whose update direction comes from a robust aggregator -- winsorized
    per-example gradients, the median of group means (M3), the running median of the
    last steps' gradients (RM3) or its running-average control (RA3) -- or plain SGD.
    With --label-noise, it tracks after every epoch how well the model fits the
    corrupt training examples' noisy labels (memorization), the pristine ones and the
    test set. Writes aggregate.csv, aggregate.png and summary.json to --out."""
    _run_staged(run_aggregate, args)
    return 0


# --------------------------------------------------------------------------------------
# The quantize job
# --------------------------------------------------------------------------------------

QUANTIZE_MODELS = ("mlp", "small_cnn", "mobilenet_v1", "mobilenet_v2")
class _QuantizeMethods:
    """``--method`` choices, read when the arguments are parsed: the registered
    quantizers' short names (``quantizers.register``) and ``tfmot8``."""

    def _names(self):
        from keras_coherence.quantization.quantizers import ALIASES, METHODS

        short = [m for m in METHODS if m not in ALIASES]
        covered = {METHODS[m] for m in short}  # a quantizer with a short name is listed once
        return short + [a for a in ALIASES if a not in covered] + ["tfmot8"]

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name):
        return name in self._names()


QUANTIZE_METHODS = _QuantizeMethods()


#: The ``quantize`` options (with ``TRAINING_ARGS`` less --model, --epochs and the label noise).
QUANTIZE_ARGS = [
    *[a for a in TRAINING_ARGS if a[0][0] not in ("--model", "--epochs", "--label-noise", "--noise-mode")],
    arg("--model", default="small_cnn", choices=QUANTIZE_MODELS,
        help="model architecture; the MobileNets get the images zero-padded to 32x32x3"),
    arg("--alpha", type=_positive_float, default=None,
        help="width multiplier of the MobileNets (default 0.25 for v1, 0.35 for v2)"),
    arg("--method", default="msqe", choices=QUANTIZE_METHODS,
        help="PO2 weight quantizer: 'msqe_baseline' (QKeras auto_po2), 'msqe' (MSQE with the "
             "paper's fixes), 'learned' (learned log2-scale); or 'tfmot8', tfmot's default 8-bit "
             "QAT (float scales, a reference)"),
    arg("--bits", type=int, choices=range(2, 9), default=None, metavar="{2..8}",
        help="weight bits (default 4; tfmot8 is 8-bit)"),
    arg("--per-channel", action=argparse.BooleanOptionalAction, default=True,
        help="one exponent per output channel of Conv2D / DepthwiseConv2D (Dense kernels are "
             "always per tensor)"),
    arg("--float-epochs", type=_positive_int, default=2, help="epochs of float training"),
    arg("--qat-epochs", type=_positive_int, default=1, help="epochs of quantization-aware training"),
    arg("--qat-lr", type=_positive_float, default=None,
        help="SGD learning rate of the QAT epochs (default: --lr / 10)"),
    arg("--every-n-steps", type=_positive_int, default=1, metavar="N",
        help="ScaleMonitor records the PO2 scales every N QAT steps"),
    arg("--out", default=os.path.join("runs", "quantize"), metavar="DIR", help="output directory"),
]


def _quantize_float_model(args, input_shape, num_classes):
    from keras_coherence import models

    if args.alpha is None:
        return _build(args, input_shape, num_classes)
    if not args.model.startswith("mobilenet"):
        raise UsageError("--alpha only applies to --model mobilenet_v1 / mobilenet_v2.")
    if args.hidden is not None:
        raise UsageError("--hidden only applies to --model mlp.")
    try:
        return models.build_model(args.model, input_shape, num_classes, alpha=args.alpha)
    except ValueError as err:
        raise UsageError(f"--model {args.model}: {err}") from err


def run_quantize(args: argparse.Namespace, out_dir: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``args.model`` in float, then quantization-aware with PO2 weight quantizers
    (``quantize_model``, ``args.method``, ``args.bits``) while a
    :class:`~keras_coherence.quantization.ScaleMonitor` records the scales; export an
    integer TFLite file and compare the float, quantized Keras and TFLite accuracy on
    the test set. Writes ``quantize.csv`` (the monitor's rows), ``quantize.png``,
    ``model.tflite`` and ``summary.json`` to ``out_dir``; returns the summary dict.

    ``args`` holds the ``quantize`` subcommand's options (``QUANTIZE_ARGS``); with
    ``--method tfmot8`` tfmot's default 8-bit scheme replaces the PO2 quantizers (no
    monitor, no CSV or plot). Raises :class:`UsageError` for bad options.
    """
    from keras_coherence import models
    from keras_coherence._keras import keras

    start = time.perf_counter()
    tfmot8 = args.method == "tfmot8"
    if tfmot8 and args.bits not in (None, 8):
        raise UsageError(f"--method tfmot8 quantizes to 8 bits; drop --bits {args.bits} or pick a PO2 method.")
    bits = 8 if tfmot8 else (args.bits or 4)
    qat_lr = args.qat_lr if args.qat_lr is not None else args.lr / 10
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test), num_classes, input_shape = _load_data(args)
    if len(x_test) == 0:
        raise UsageError(f"--dataset {args.dataset}: the test split is empty; the accuracies need it.")
    if args.model.startswith("mobilenet") and len(input_shape) == 3 and (
            min(input_shape[:2]) < 32 or input_shape[2] == 1):
        size = max(32, *input_shape[:2])
        try:
            x_train, x_test = models.pad_images(x_train, size), models.pad_images(x_test, size)
        except ValueError as err:
            raise UsageError(f"--model {args.model}: {err}") from err
        input_shape = tuple(x_train.shape[1:])
    n = len(x_train)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    float_model = _quantize_float_model(args, input_shape, num_classes)
    float_model.compile(keras.optimizers.SGD(args.lr), loss, metrics=["accuracy"])
    steps_per_epoch = math.ceil(n / args.batch_size)
    scheme = "tfmot's default 8-bit QAT" if tfmot8 else (
        f"{bits}-bit {args.method} PO2 weights (one exponent per "
        f"{'conv output channel, per Dense kernel' if args.per_channel else 'kernel'})")
    log(f"quantize: {args.model} ({float_model.count_params():,} parameters) on {args.dataset}, {n} training "
        f"examples, batch {args.batch_size}; float: {_epochs(args.float_epochs)} "
        f"SGD lr {args.lr}; QAT: {scheme}, 8-bit activations, {_epochs(args.qat_epochs)} "
        f"SGD lr {qat_lr:g}")
    verbose = 0 if args.quiet else 1
    t0 = time.perf_counter()
    float_model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.float_epochs, shuffle=True,
                    verbose=verbose)
    float_seconds = time.perf_counter() - t0
    _, float_acc = float_model.evaluate(x_test, y_test, batch_size=1024, verbose=0)

    from keras_coherence.quantization.evaluate import qat_evaluate

    try:
        result = qat_evaluate(float_model, (x_train, y_train), (x_test, y_test), method=args.method, bits=bits,
                              per_channel=args.per_channel, qat_epochs=args.qat_epochs,
                              optimizer=keras.optimizers.SGD(qat_lr), batch_size=args.batch_size,
                              every_n_steps=args.every_n_steps, verbose=verbose)
    except ValueError as err:
        raise UsageError(str(err)) from err
    monitor, tflite_model = result["monitor"], result["tflite"]
    accuracy, tflite_info, scales = result["accuracy"], result["tflite_info"], result["scales"]
    accuracy["float"] = float(float_acc)  # as evaluate() reported it above
    qat_seconds, export_seconds = result["seconds"]["qat"], result["seconds"]["export"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.tflite"), "wb") as f:
        f.write(tflite_model)

    files = {"tflite": "model.tflite", "summary": "summary.json"}
    if monitor is not None:
        files["csv"] = os.path.basename(monitor.to_csv(os.path.join(out_dir, "quantize.csv")))
        files["plot"] = os.path.basename(monitor.plot(
            os.path.join(out_dir, "quantize.png"),
            title=f"{bits}-bit {args.method} PO2 scales during QAT: {args.model} on {args.dataset}"))
    summary = {
        "command": "quantize",
        "config": {k: _jsonable(v) for k, v in sorted(vars(args).items()) if not k.startswith("_")},
        "data": {"dataset": args.dataset, "num_train": n, "num_test": int(len(x_test)),
                 "num_classes": num_classes, "input_shape": list(input_shape)},
        "model": {"name": args.model, "parameters": int(float_model.count_params())},
        "quantization": {"method": args.method, "bits": bits, "per_channel": bool(args.per_channel),
                         "activation_bits": 8},
        "training": {"float_epochs": args.float_epochs, "qat_epochs": args.qat_epochs,
                     "steps_per_epoch": steps_per_epoch, "qat_steps": steps_per_epoch * args.qat_epochs,
                     "qat_step_ms_median": result["step_ms"],
                     "lr": args.lr, "qat_lr": qat_lr},
        "accuracy": accuracy,
        "tflite": tflite_info,
        "logit_steps": result["logit_steps"],
        "litert_rounding": result["litert_rounding"],
        "scales": scales,
        "wall_seconds": {"total": time.perf_counter() - start, "float_training": float_seconds,
                         "qat": qat_seconds, "export": export_seconds},
        "files": files,
    }
    _write_summary(out_dir, summary)

    log(f"  test accuracy ({len(x_test)} examples): float {accuracy['float']:.3f}, quantized (Keras) "
        f"{accuracy['quantized_keras']:.3f}, TFLite {accuracy['tflite']:.3f} "
        f"(Keras/TFLite top-1 agreement {accuracy['keras_tflite_agreement']:.3f})")
    if result["litert_rounding"] is not None:
        lr = result["litert_rounding"]
        log(f"  Keras rounding as LiteRT does (litert_rounding, {lr['patched']} ops emulated): top-1 agreement "
            f"{lr['agreement']:.3f}, largest logit difference {lr['logit_steps']['max']:.1f} output steps")
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    log(f"  TFLite ({tflite_info['bytes'] / 1024:.0f} kB): {tflite_info['po2_tensors']} of "
        f"{tflite_info['weight_tensors']} weight tensors have exact power-of-two scales (all: "
        f"{yes(tflite_info['all_scales_po2'])}); zero points all 0: {yes(tflite_info['zero_points_zero'])}; "
        f"largest |weight code| {tflite_info['max_abs_weight_code']}")
    if scales is not None:
        final = scales["final"]
        log(f"  PO2 scales: {scales['flips']} exponent flips in {scales['records']} records (mean flip rate "
            f"{scales['mean_flip_rate']:.3g}); final clip fraction {final['clip_fraction']:.3g}, "
            f"MSQE {final['msqe']:.3g}")
    log(f"  {summary['wall_seconds']['total']:.1f} s; wrote {os.path.join(out_dir, '')}"
        f"{{{', '.join(sorted(files.values()))}}}")
    return summary


@subcommand(
    "quantize",
    help="train in float, then quantization-aware with power-of-two weight scales; export integer TFLite",
    arguments=QUANTIZE_ARGS,
)
def quantize_command(args):
    """Train a model in float, then quantization-aware (tfmot QAT, batch norm folded)
    with power-of-two (PO2) weight quantizers while ScaleMonitor records every
    layer's exponents, exponent flips, clip fraction and MSQE; export an integer
    TFLite model and report the float, quantized (Keras) and TFLite test accuracy and
    whether every exported weight scale is an exact power of two. Writes
    quantize.csv, quantize.png, model.tflite and summary.json to --out."""
    _run_staged(run_quantize, args)
    return 0


# --------------------------------------------------------------------------------------
# The bnn job
# --------------------------------------------------------------------------------------

BNN_MODELS = ("mlp", "cnv", "binarynet", "resnet_e18")
BNN_METHODS = ("standard", "standard_device", "low_memory", "low_memory_po2")
BNN_OPTIMIZERS = ("adam", "bop")

#: The ``bnn`` options (--seed and --quiet of ``TRAINING_ARGS``; the rest are its own).
BNN_ARGS = [
    arg("--dataset", default="embedded_mnist",
        help="'embedded_mnist' (offline, 4000 train / 1000 test) or a tensorflow_datasets name prepared "
             "in TFDS's default data directory (train_bnn loads it by name)"),
    arg("--max-train", type=_positive_int, default=None, metavar="N",
        help="use at most N training examples (train_bnn caps the test split at N too)"),
    arg("--model", default="mlp", choices=BNN_MODELS,
        help="binary network; cnv and resnet_e18 need images of at least 32x32 (train_bnn does not pad)"),
    arg("--hidden", type=_widths, default=None, metavar="W1,W2,..",
        help="hidden widths of the mlp (default 256,256,256,256)"),
    arg("--method", default="low_memory", choices=BNN_METHODS,
        help="'standard' (larq layers, float32 training) or the low-memory method (float16 or PO2 "
             "activation gradients)"),
    arg("--optimizer", default="adam", choices=BNN_OPTIMIZERS,
        help="Keras training optimizer ('bop': Bop on the binary kernels, Adam on the rest); the "
             "on-device training model always uses Adam"),
    arg("--epochs", type=_positive_int, default=5, help="training epochs"),
    arg("--batch-size", type=_positive_int, default=100,
        help="mini-batch size of the Keras training, the memory table and the on-device steps"),
    arg("--lr", type=_positive_float, default=1e-3,
        help="Adam learning rate (Keras training and the on-device training model)"),
    arg("--device-steps", type=_positive_int, default=5, metavar="N",
        help="on-device training steps run in LiteRT after the export (the batches 'python -m edge "
             "train --seed SEED' starts with)"),
    arg("--export", default=None, metavar="DIR",
        help="where the .tflite files and the .npz data go (default: <--out>/export)"),
    arg("--no-device-export", action="store_true",
        help="skip the on-device training export and its LiteRT steps (without it, a model whose "
             "training graph does not lower to TFLite builtins is an error, exit 2)"),
    *[a for a in TRAINING_ARGS if a[0][0] in ("--seed", "--quiet")],
    arg("--out", default=os.path.join("runs", "bnn"), metavar="DIR", help="output directory"),
]


def _bnn_data(args):
    """``((x, y), (x_test, y_test))`` as ``train_bnn`` loads them (inputs scaled to [-1, 1],
    int32 labels), for the exports and the device; UsageError for a bad dataset or size."""
    from keras_coherence import data
    from keras_coherence.binary.training import scale_inputs

    try:
        (x, y), (x_test, y_test) = data.load_dataset(args.dataset, max_examples=args.max_train, seed=args.seed)
    except data.DatasetNotAvailableError as err:
        raise UsageError(f"--dataset {args.dataset}: {str(err).splitlines()[0]}") from err
    except (ValueError, ImportError) as err:
        raise UsageError(f"--dataset {args.dataset}: {err}") from err
    if len(x_test) == 0:
        raise UsageError(f"--dataset {args.dataset}: the test split is empty; the accuracies need it.")
    if args.batch_size > len(x):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(x)} training examples "
                         "(the on-device runner trains on full batches only).")
    return (scale_inputs(x), y.astype(np.int32)), (scale_inputs(x_test), y_test.astype(np.int32))


def _bnn_model_kwargs(args, input_shape, num_classes):
    """The builder kwargs ``train_bnn`` gets; builds the model once so that a model that does
    not fit the data fails before training."""
    from keras_coherence.binary.models import build_model

    kwargs = _hidden_kwargs(args)
    try:
        build_model(args.model, args.method, input_shape=input_shape, num_classes=num_classes, **kwargs)
    except ValueError as err:
        shape = "x".join(map(str, input_shape))
        hint = "" if args.model == "mlp" else (
            "; the conv models are built for 32x32 images and train_bnn trains on the images as loaded "
            "(no padding): use --model mlp or binarynet, or a 32x32 dataset")
        reason = str(err).strip().splitlines()[0].rstrip(".")
        raise UsageError(f"--model {args.model} does not fit the {shape} inputs of --dataset {args.dataset} "
                         f"({reason}){hint}.") from err
    return kwargs


def _bnn_memory(args, input_shape, num_classes, kwargs):
    """Modelled training memory (``memory_profile``) of standard training and of ``args.method``
    at ``args.batch_size``: ``(summary dict, per-layer CSV rows)``."""
    from keras_coherence.binary.memory import memory_profile

    profiles = {m: memory_profile(args.model, args.batch_size, m, args.optimizer, input_shape=input_shape,
                                  num_classes=num_classes, **kwargs)
                for m in dict.fromkeys(("standard", args.method))}
    bits = {m: p.totals() for m, p in profiles.items()}
    mib = {m: {k: v / 8 / 2 ** 20 for k, v in t.items()} for m, t in bits.items()}
    summary = {"batch_size": args.batch_size, "optimizer": args.optimizer, "optimizer_bits": 32,
               "bits": bits, "mib": mib, "ratio": bits["standard"]["peak"] / bits[args.method]["peak"]}
    rows = [{"method": m, **dataclasses.asdict(r)} for m, p in profiles.items() for r in p.rows]
    return summary, rows


def _bnn_memory_lines(memory, method):
    """The totals table: one line per column, standard vs ``method`` in MiB and their ratio."""
    from keras_coherence.binary.memory import COLUMNS

    std, low = memory["mib"]["standard"], memory["mib"][method]
    lines = [f"  modelled training memory at batch {memory['batch_size']} ({memory['optimizer']}, "
             f"{memory['optimizer_bits']}-bit optimizer slots), MiB:",
             f"    {'':<18} {'standard':>10} {method:>15} {'ratio':>7}"]
    for key in (*COLUMNS, "peak"):
        ratio = f"{std[key] / low[key]:.2f}x" if low[key] else "-"
        lines.append(f"    {key:<18} {std[key]:>10.3f} {low[key]:>15.3f} {ratio:>7}")
    return lines


def _write_summary(out_dir, summary):
    """Adds the package versions to ``summary`` and writes it to ``out_dir/summary.json``."""
    from keras_coherence import __version__
    from keras_coherence._keras import tf

    summary["versions"] = {"keras_coherence": __version__, "tensorflow": tf.__version__,
                           "python": platform.python_version()}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")


def _keras_adam_state(module, optimizer):
    """The ``TrainingModule`` state entries of a Keras ``Adam`` optimizer's moments and step
    (its variables ``Adam/m/<variable>``, ``Adam/v/<variable>``).

    Returns None, by design, when the Keras training did not use Adam (``--optimizer bop``:
    Bop's state is no Adam moment, so the device starts Adam afresh; the summary says
    ``"fresh"``). Raises ValueError when an Adam optimizer's state does not cover every
    trainable variable of the module (the device would otherwise silently restart some
    weights' moments)."""
    import re

    from keras_coherence._keras import keras
    from keras_coherence.binary.export_training import state_name

    if not isinstance(optimizer, (keras.optimizers.Adam, keras.optimizers.legacy.Adam)):
        return None
    state = {"adam_step": np.float32(optimizer.iterations.numpy())}
    variables = optimizer.variables
    for var in variables() if callable(variables) else variables:  # a method on legacy optimizers
        match = re.fullmatch(r"Adam/([mv])/(.+)", var.name)
        if match:
            state[f"adam_{match[1]}_{state_name(match[2])}"] = var.numpy()
    wanted = {f"adam_{k}_{n}" for n in module.trainable_names for k in "mv"}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(
            f"the Keras Adam state cannot be carried to the device: no moments for {missing} (the "
            f"optimizer has {sorted(k for k in state if k != 'adam_step')[:6]}...); train with "
            "train_bnn's Adam, or pass --no-device-export")
    return state


def _edge_runner():
    """``edge.runner`` (the device side); UsageError when the package is not importable."""
    try:
        from edge import runner
    except ImportError as err:
        raise UsageError(f"the device runner 'edge' is not importable ({err}); run from the repository "
                         "root or reinstall the package") from err
    return runner


def _bnn_device_steps(runner, path, train, test, args):
    """Runs ``args.device_steps`` training steps of the exported training model in LiteRT on
    the batches ``python -m edge train --seed SEED`` starts with; returns the device report."""
    (x, y), (x_test, y_test) = train, test
    device = runner.TrainingModel(path)
    before = device.infer(x_test)
    batches, epoch = [], 1
    while len(batches) < args.device_steps:
        batches += runner.epoch_batches(len(x), args.batch_size, args.seed, epoch)
        epoch += 1
    losses = [device.train_step(x[idx], y[idx]) for idx in batches[:args.device_steps]]
    after = device.infer(x_test)
    return {
        "signatures": sorted(device.interpreter.get_signature_list()),
        "optimizer": "adam",
        "steps": len(losses),
        "losses": losses,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "loss_slope_per_step": float(np.polyfit(np.arange(len(losses)), losses, 1)[0]) if len(losses) > 1 else None,
        "accuracy_before": float(np.mean(before.argmax(-1) == y_test)),
        "accuracy_after": float(np.mean(after.argmax(-1) == y_test)),
        "logits_before": before,
    }


def run_bnn(args: argparse.Namespace, out_dir: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train a binary network (``train_bnn``: ``args.model``, ``args.method``,
    ``args.optimizer``), model its training memory against standard training
    (``memory_profile``), export it for LCE inference (``export_lce``: size against a
    float TFLite file, Keras/LCE agreement) and as a builtin-only on-device training model
    (``export_training``), and run ``args.device_steps`` training steps of that model in
    LiteRT (``edge.runner``). Writes ``summary.json`` and ``memory.csv`` to ``out_dir`` and
    ``model_lce.tflite``, ``model_train.tflite``, ``train.npz`` and ``test.npz`` to
    ``args.export`` (default ``out_dir/export``); returns the summary dict, whose
    ``edge_commands`` are the ``python -m edge`` command lines for those files.

    The training model of a conv model trains on batches of exactly ``args.batch_size``
    (its convolution backward needs a fixed batch). A model whose training graph does not
    lower to TFLite builtins (e.g. the standard, autodiff-trained conv models need
    ``Conv2DBackpropFilter``), or whose Keras Adam state cannot be carried over, is an
    error: :class:`UsageError` is raised (exit status 2) after ``summary.json`` is written
    with ``summary["device"]["error"]`` (the command line then drops the staged run and
    keeps the previous ``--out``); ``args.no_device_export`` skips
    that stage instead (``summary["device"]["skipped"]``). Raises :class:`UsageError` for
    bad options.
    """
    import shlex

    from keras_coherence import experiments
    from keras_coherence.binary import export_lce, export_training
    from keras_coherence.binary.training import train_bnn

    start = time.perf_counter()
    runner = _edge_runner()
    train, test = _bnn_data(args)
    (x, y), (x_test, y_test) = train, test
    num_classes = int(max(y.max(), y_test.max())) + 1
    input_shape = tuple(x.shape[1:])
    kwargs = _bnn_model_kwargs(args, input_shape, num_classes)
    export_dir = args.export or os.path.join(out_dir, "export")

    log(f"bnn: {args.model} ({args.method}) on {args.dataset}, {len(x)} training / {len(x_test)} test examples; "
        f"{args.optimizer} lr {args.lr:g}, batch {args.batch_size}, {_epochs(args.epochs)}")
    try:
        result = train_bnn(args.model, args.method, epochs=args.epochs, batch_size=args.batch_size,
                           optimizer=args.optimizer, learning_rate=args.lr, dataset=args.dataset,
                           max_examples=args.max_train, seed=args.seed, verbose=0 if args.quiet else 1, **kwargs)
    except ValueError as err:
        raise UsageError(str(err).strip().splitlines()[0]) from err
    model = result.model
    log(f"  test accuracy {result.test_accuracy:.3f} (train {result.summary()['train_accuracy']:.3f}); "
        f"{result.seconds:.1f} s of training")

    memory, memory_rows = _bnn_memory(args, input_shape, num_classes, kwargs)
    for line in _bnn_memory_lines(memory, args.method):
        log(line)

    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(export_dir, exist_ok=True)
    paths = {name: os.path.join(export_dir, name)
             for name in ("model_lce.tflite", "model_train.tflite", "train.npz", "test.npz")}
    np.savez(paths["train.npz"], x=x, y=y)
    np.savez(paths["test.npz"], x=x_test, y=y_test)

    t0 = time.perf_counter()
    lce_model = export_lce.to_lce(model)
    with open(paths["model_lce.tflite"], "wb") as f:
        f.write(lce_model)
    report = export_lce.compare(model, x_test, repeats=10, lce_model=lce_model)
    lce_accuracy = float(np.mean(export_lce.lce_predict(lce_model, x_test).argmax(-1) == y_test))
    lce = {"file": paths["model_lce.tflite"], "bytes": report.lce_bytes, "float_tflite_bytes": report.float_bytes,
           "size_ratio": report.size_ratio, "ops": report.lce_ops, "test_accuracy": lce_accuracy,
           "keras_max_abs_diff": report.max_abs_diff, "keras_argmax_agreement": report.argmax_agreement,
           "latency_ms": report.lce_latency_s * 1e3, "float_latency_ms": report.float_latency_s * 1e3}
    lce_seconds = time.perf_counter() - t0
    log(f"  LCE inference model: {report.lce_bytes / 1024:.0f} kB vs {report.float_bytes / 1024:.0f} kB float "
        f"TFLite ({report.size_ratio:.3f}x); test accuracy {lce_accuracy:.3f}; Keras/LCE top-1 agreement "
        f"{report.argmax_agreement:.3f}, max |logit difference| {report.max_abs_diff:.2g}")

    t0 = time.perf_counter()
    export_error, device = None, None
    if args.no_device_export:
        device = {"file": None, "error": None, "skipped": "--no-device-export"}
        log("  on-device training model: skipped (--no-device-export)")
    else:
        try:
            # convolutions' hand-written filter gradients lower to builtins only with a fixed batch
            batch = None if args.model == "mlp" else args.batch_size
            module = export_training.TrainingModule(model, learning_rate=args.lr, batch_size=batch)
            adam = _keras_adam_state(module, model.optimizer)
            if adam is not None:  # the device continues Keras's Adam where it stopped
                module.assign({**module.weights(), **adam})
            train_model = export_training.to_tflite(module)
        except ValueError as err:
            export_error = str(err).strip().splitlines()[0]
            device = {"file": None, "error": str(err), "skipped": None}
            log(f"  on-device training model: failed: {export_error[:300]}")
    if device is None:  # exported: the device steps
        with open(paths["model_train.tflite"], "wb") as f:
            f.write(train_model)
        device = _bnn_device_steps(runner, paths["model_train.tflite"], train, test, args)
        keras_logits = model.predict(x_test, batch_size=1024, verbose=0)
        device.update(file=paths["model_train.tflite"], bytes=len(train_model), error=None, skipped=None,
                      adam_moments="from Keras" if adam is not None else "fresh",
                      keras_max_abs_diff=float(np.abs(device.pop("logits_before") - keras_logits).max()))
        log(f"  on-device training model: {len(train_model) / 1024:.0f} kB, signatures "
            f"{', '.join(device['signatures'])}; test accuracy {device['accuracy_before']:.3f} (max |logit "
            f"difference| to Keras {device['keras_max_abs_diff']:.2g})")
        log(f"  {device['steps']} on-device steps in LiteRT (Adam lr {args.lr:g}, {device['adam_moments']} "
            "moments): loss "
            + " ".join(f"{v:.4f}" for v in device["losses"])
            + f"; test accuracy after {device['accuracy_after']:.3f}")
    device_seconds = time.perf_counter() - t0

    edge_commands = None
    if device["file"]:
        checkpoints = os.path.join(export_dir, "checkpoints")
        quote = lambda parts: " ".join(shlex.quote(str(p)) for p in parts)  # noqa: E731
        edge_commands = {
            "train": quote(["python", "-m", "edge", "train", paths["model_train.tflite"], "--data", paths["train.npz"],
                            "--epochs", args.epochs, "--batch-size", args.batch_size, "--seed", args.seed,
                            "--checkpoint-dir", checkpoints]),
            "infer": quote(["python", "-m", "edge", "infer", paths["model_train.tflite"], "--data", paths["test.npz"],
                            "--weights", os.path.join(checkpoints, f"epoch_{args.epochs:04d}.npz")]),
        }
    experiments.write_csv(os.path.join(out_dir, "memory.csv"), memory_rows)
    files = {"summary": "summary.json", "memory_csv": "memory.csv", "lce_model": paths["model_lce.tflite"],
             "training_model": device["file"], "train_data": paths["train.npz"], "test_data": paths["test.npz"]}
    summary = {
        "command": "bnn",
        "config": {k: _jsonable(v) for k, v in sorted(vars(args).items()) if not k.startswith("_")},
        "data": {"dataset": args.dataset, "num_train": len(x), "num_test": len(x_test), "num_classes": num_classes,
                 "input_shape": list(input_shape), "input_range": [-1.0, 1.0]},
        "model": {"name": args.model, "method": result.method, "parameters": int(model.count_params())},
        "training": {"optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs,
                     "batch_size": args.batch_size, "steps_per_epoch": math.ceil(len(x) / args.batch_size)},
        "accuracy": {"train": result.summary()["train_accuracy"], "test": result.test_accuracy,
                     "test_loss": result.test_loss, "lce_test": lce_accuracy,
                     "device_test_before_steps": device.get("accuracy_before"),
                     "device_test_after_steps": device.get("accuracy_after")},
        "memory": memory,
        "lce": lce,
        "device": device,
        "edge_commands": edge_commands,
        "wall_seconds": {"total": time.perf_counter() - start, "training": result.seconds,
                         "lce_export": lce_seconds, "device_export_and_steps": device_seconds},
        "files": files,
    }
    _write_summary(out_dir, summary)
    if export_error is not None:  # the summary (with the error) is written; the run failed
        raise UsageError(f"on-device training export of --model {args.model} --method {args.method} failed: "
                         f"{export_error} (pass --no-device-export to skip this stage)")
    if edge_commands:
        log("  train it on the device (LiteRT + numpy only), then evaluate its checkpoint:")
        log(f"    {edge_commands['train']}")
        log(f"    {edge_commands['infer']}")
    log(f"  {summary['wall_seconds']['total']:.1f} s; wrote {os.path.join(out_dir, '')}{{summary.json, memory.csv}} "
        f"and {os.path.join(export_dir, '')}{{{', '.join(n for n in paths if n != 'model_train.tflite' or device['file'])}}}")
    return summary


@subcommand(
    "bnn",
    help="train a binary network (standard or low-memory), export it for LCE inference and on-device "
         "training, and run a few on-device steps",
    arguments=BNN_ARGS,
)
def bnn_command(args):
    """Train a binary network with train_bnn (standard, low-memory or low-memory with PO2
    gradients; Adam or Bop), print its test accuracy and the modelled training memory of
    standard training against the chosen method at the batch size, export an LCE inference
    model (size against a float TFLite file, Keras/LCE agreement) and a builtin-only
    on-device training model (signatures train/infer/get_weights/set_weights), run a few
    training steps of it in LiteRT and print the 'python -m edge train' command that
    continues on the device. Writes summary.json and memory.csv to --out and the .tflite
    files and train/test .npz data to --export."""
    _run_staged(run_bnn, args)
    return 0


def _run_staged(run, args):
    """``run(args, out_dir, log=...)`` into a fresh folder that replaces ``--out`` only
    when the run succeeds (checked before any work; see keras_coherence._output)."""
    with staged_output(args.out) as stage:
        return run(args, stage.path, log=lambda line: print(stage.public(line), flush=True))


def _demo_log(demo_args, quiet=None):
    """The demo sections' log: silent with --quiet, final paths instead of staging ones."""
    quiet = demo_args.quiet if quiet is None else quiet
    stage = getattr(demo_args, "_stage", None)
    public = stage.public if stage is not None else (lambda line: line)
    return lambda line: None if quiet else print(public(line), flush=True)


# --------------------------------------------------------------------------------------
# The demo: short sections, one per job
# --------------------------------------------------------------------------------------

_DEMO_SECTIONS: Dict[str, Tuple[str, Callable[[str, argparse.Namespace], str]]] = {}


def demo_section(name: str, title: str):
    """Register ``run(out_dir, args) -> one-line result`` as a section of ``demo``;
    it writes into ``<--out>/<name>/`` and should take well under a minute on 2 CPU cores."""
    def register(run):
        _DEMO_SECTIONS[name] = (title, run)
        return run
    return register


def _defaults(arguments, **overrides):
    """A Namespace with the defaults of ``arguments`` (arg specs), then ``overrides``."""
    parser = argparse.ArgumentParser(add_help=False)
    for flags, kwargs in arguments:
        parser.add_argument(*flags, **kwargs)
    args = parser.parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise AttributeError(f"no option {key!r}")
        setattr(args, key, value)
    return args


#: The coherence demo's configuration (tests shrink it).
_DEMO_COHERENCE = {"epochs": 5, "batch_size": 50, "probe_size": 512, "every_n_steps": 8, "max_train": None}


@demo_section("coherence", "m-coherence while an MLP learns the embedded MNIST")
def _demo_coherence(out_dir, demo_args):
    # 5 epochs x 80 steps of SGD on the 4,000 embedded training images, 51 measurements
    # on a 512-example probe: about 15 s on 2 CPU cores.
    args = _defaults([*TRAINING_ARGS, *COHERENCE_ARGS], model="mlp", lr=0.1, **_DEMO_COHERENCE,
                     seed=demo_args.seed, quiet=demo_args.quiet)
    s = run_coherence(args, out_dir, log=_demo_log(demo_args, quiet=False))
    mc = s["m_coherence"]
    return (f"m-coherence {mc['first']['value']:.3g} -> peak {mc['peak']['value']:.3g} -> "
            f"{mc['last']['value']:.3g}; test accuracy {s['accuracy']['test']:.3f}")


#: The aggregation demo's configuration (tests shrink it).
_DEMO_AGGREGATION = {"aggregators": ("sgd", "winsorized:c=8", "rm3"), "max_train": 300, "epochs": 40,
                     "label_noise": 0.5, "hidden": (64, 64)}


@demo_section("aggregation", "SGD vs winsorized (c=8) vs RM3 on 50% noisy labels")
def _demo_aggregation(out_dir, demo_args):
    # 300 embedded training images, half of them with a wrong label; 40 epochs of each
    # arm (SGD lr 0.1, batch 100) on a 784-64-64-10 MLP. About 60 s on 2 busy CPU
    # cores, most of it the winsorized arm (its first epoch traces the step for ~10-20 s).
    # Over 40 epochs SGD starts fitting the wrong labels; winsorizing (c=8) slows that.
    from keras_coherence import experiments

    cfg = _DEMO_AGGREGATION
    runs, lines = {}, []
    for spec in cfg["aggregators"]:
        args = _defaults([*TRAINING_ARGS, *AGGREGATE_ARGS], aggregator=spec, epochs=cfg["epochs"],
                         max_train=cfg["max_train"], label_noise=cfg["label_noise"],
                         hidden=tuple(cfg["hidden"]), batch_size=100, lr=0.1, seed=demo_args.seed,
                         quiet=True)
        arm = _parse_aggregator(spec, args.batch_size)
        arm_dir = os.path.join(out_dir, arm.spec.replace(":", "_").replace("=", ""))  # e.g. winsorized_c8
        s = run_aggregate(args, arm_dir, log=_demo_log(demo_args))
        runs[arm.label] = experiments.read_rows(os.path.join(arm_dir, "aggregate.csv"))
        f = s["accuracy"]["final"]
        lines.append(f"{arm.label} corrupt {f['corrupt']:.2f} test {f['test']:.2f}")
    experiments.plot_accuracy_panels(
        runs, os.path.join(out_dir, "aggregation.png"),
        [("pristine_accuracy", "pristine training examples"),
         ("corrupt_accuracy", "corrupt examples, noisy labels"), ("test_accuracy", "test set")],
        chance=0.1, title=f"{cfg['label_noise']:.0%} label noise, {cfg['max_train']} embedded MNIST "
                          f"images, MLP {'-'.join(map(str, (784, *cfg['hidden'], 10)))}, SGD lr 0.1, batch 100")
    return "; ".join(lines)


#: The quantization demo's configuration (tests shrink it).
_DEMO_QUANTIZATION = {"model": "mlp", "hidden": (64,), "max_train": 2000, "float_epochs": 3, "qat_epochs": 1,
                      "bits": 4, "method": "msqe", "batch_size": 50}


@demo_section("quantization", "4-bit power-of-two weights: float -> QAT -> integer TFLite")
def _demo_quantization(out_dir, demo_args):
    # A 784-64-10 MLP on 2,000 embedded training images: 3 float epochs, 1 QAT epoch with
    # 4-bit MSQE PO2 weights (ScaleMonitor on every step), integer TFLite export. About
    # 15-20 s on 2 CPU cores, a third of it the TFLite conversion.
    cfg = dict(_DEMO_QUANTIZATION)
    args = _defaults(QUANTIZE_ARGS, model=cfg["model"], hidden=tuple(cfg["hidden"]), max_train=cfg["max_train"],
                     float_epochs=cfg["float_epochs"], qat_epochs=cfg["qat_epochs"], bits=cfg["bits"],
                     method=cfg["method"], batch_size=cfg["batch_size"], seed=demo_args.seed, quiet=True)
    s = run_quantize(args, out_dir, log=_demo_log(demo_args))
    acc, lite = s["accuracy"], s["tflite"]
    return (f"test accuracy float {acc['float']:.3f}, {s['quantization']['bits']}-bit Keras "
            f"{acc['quantized_keras']:.3f}, TFLite {acc['tflite']:.3f}; PO2 scales "
            f"{'all exact' if lite['all_scales_po2'] else 'NOT all exact'}; "
            f"{s['scales']['flips']} exponent flips")


#: The binary-network demo's configuration (tests shrink it).
_DEMO_BNN = {"model": "mlp", "method": "low_memory", "hidden": None, "max_train": 2000, "epochs": 3,
             "batch_size": 100, "device_steps": 3}


@demo_section("bnn", "binary MLP trained low-memory, exported for LCE and on-device training")
def _demo_bnn(out_dir, demo_args):
    # The paper's 784-256x4-10 binary MLP, low-memory method, 1 epoch of Adam on 1,000
    # embedded training images; LCE and training exports and 3 on-device steps in LiteRT.
    # About 30 s on 2 CPU cores, most of it the two TFLite conversions.
    cfg = dict(_DEMO_BNN)
    args = _defaults(BNN_ARGS, model=cfg["model"], method=cfg["method"], hidden=cfg["hidden"],
                     max_train=cfg["max_train"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                     device_steps=cfg["device_steps"], seed=demo_args.seed, quiet=True)
    s = run_bnn(args, out_dir, log=_demo_log(demo_args))
    losses = s["device"].get("losses")
    trend = (f"device loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps" if losses
             else "no on-device training model")
    return (f"test accuracy {s['accuracy']['test']:.3f} (LCE {s['accuracy']['lce_test']:.3f}); modelled memory "
            f"{s['memory']['ratio']:.2f}x below standard; LCE file {s['lce']['size_ratio']:.2f}x the float "
            f"TFLite; {trend}")


@subcommand(
    "demo",
    help="short runs of every job on the embedded MNIST (what `make demo` runs)",
    arguments=[
        arg("--out", default=os.path.join("runs", "demo"), metavar="DIR",
            help="output directory; each section writes to DIR/<section>/"),
        arg("--only", action="append", default=None, metavar="SECTION",
            help="run only this section (repeatable)"),
        arg("--seed", type=int, default=0, help="random seed"),
        arg("--quiet", action="store_true", help="no progress bars"),
    ],
)
def demo_command(args):
    """Short, CPU-friendly runs of the library's jobs on the offline embedded MNIST."""
    names = list(_DEMO_SECTIONS)
    if args.only:
        unknown = [s for s in args.only if s not in _DEMO_SECTIONS]
        if unknown:
            raise UsageError(f"--only: unknown section(s) {', '.join(unknown)}; "
                             f"known: {', '.join(names)}.")
        names = [s for s in names if s in args.only]
    start = time.perf_counter()
    results = []
    with staged_output(args.out) as stage:  # the old --out is replaced only on success
        args._stage = stage
        for i, name in enumerate(names, 1):
            title, run = _DEMO_SECTIONS[name]
            print(f"\n[{i}/{len(names)}] {name}: {title}", flush=True)
            t0 = time.perf_counter()
            line = run(os.path.join(stage.path, name), args)
            results.append((name, stage.public(line), time.perf_counter() - t0))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; results in {args.out}/")
    for name, line, seconds in results:
        print(f"  {name:<12} {line}  ({seconds:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None, prog: str = PROG) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status
    (0 success, 2 bad arguments). ``--help`` and ``--version`` return 0."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    from keras_coherence._keras import tf

    with _quiet_python_logging(tf):
        with _quiet_device_init():
            tf.config.list_physical_devices()
        try:
            return int(args._run(args) or 0)
        except (UsageError, OutputDirError) as err:
            print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog} {args.command}: interrupted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _quiet_python_logging(tf):
    """TensorFlow's Python logger and absl (used by tensorflow_datasets, e.g. about
    half-prepared data folders) at ERROR while a command runs; restored afterwards so
    that calling main() in-process leaves logging as it was."""
    logger = tf.get_logger()
    saved_level = logger.level
    logger.setLevel("ERROR")
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - absl is a TensorFlow dependency
        absl_logging = None
    saved_verbosity = absl_logging.get_verbosity() if absl_logging else None
    if absl_logging:
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        if absl_logging:
            absl_logging.set_verbosity(saved_verbosity)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
