"""Train a binary network standard or with low memory, compare its modelled training
memory with standard training, export it for Larq Compute Engine inference and as a
builtin-only on-device training model, and run a few training steps of that in LiteRT.

>>> from keras_coherence.workflows import bnn
>>> summary = bnn.run(bnn.Config(epochs=1, max_train=500), "runs/bnn")  # doctest: +SKIP
>>> summary["edge_commands"]["train"]  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Tuple

import numpy as np

from keras_coherence.workflows import _common as c

__all__ = ["Config", "keras_adam_state", "run"]

HELP = ("train a binary network (standard or low-memory), export it for LCE inference and on-device training, "
        "and run a few on-device steps")
METHODS = ("standard", "standard_device", "low_memory", "low_memory_po2")
OPTIMIZERS = ("adam", "bop")


@dataclasses.dataclass
class Config:
    """Train a binary network with train_bnn (standard, low-memory or low-memory with PO2
    gradients; Adam or Bop), print its test accuracy and the modelled training memory of
    standard training against the chosen method at the batch size, export an LCE inference
    model (size against a float TFLite file, Keras/LCE agreement) and a builtin-only
    on-device training model (signatures train/infer/get_weights/set_weights), run a few
    training steps of it in LiteRT and print the 'python -m edge train' command that
    continues on the device. Writes summary.json and memory.csv to --out and the .tflite
    files and train/test .npz data to --export."""

    dataset: str = c.option("embedded_mnist", "'embedded_mnist' (offline, 4000 train / 1000 test) or a "
                            "tensorflow_datasets name prepared in TFDS's default data directory (train_bnn loads "
                            "it by name)")
    max_train: Optional[int] = c.max_train_field(" (train_bnn caps the test split at N too)")
    model: str = c.option("mlp", "binary network; cnv and resnet_e18 need images of at least 32x32 (train_bnn "
                          "does not pad)", choices=c.BINARY_MODEL_CHOICES)
    hidden: Optional[Tuple[int, ...]] = c.hidden_field("256,256,256,256")
    method: str = c.option("low_memory", "'standard' (larq layers, float32 training) or the low-memory method "
                           "(float16 or PO2 activation gradients)", choices=METHODS)
    optimizer: str = c.option("adam", "Keras training optimizer ('bop': Bop on the binary kernels, Adam on the "
                              "rest); the on-device training model always uses Adam", choices=OPTIMIZERS)
    epochs: int = c.epochs_field()
    batch_size: int = c.batch_size_field(100, "mini-batch size of the Keras training, the memory table and the "
                                         "on-device steps")
    lr: float = c.lr_field(1e-3, "Adam learning rate (Keras training and the on-device training model)")
    device_steps: int = c.option(5, "on-device training steps run in LiteRT after the export (the batches "
                                 "'python -m edge train --seed SEED' starts with)", check=c.positive_int,
                                 metavar="N")
    export: Optional[str] = c.option(None, "where the .tflite files and the .npz data go (default: "
                                     "<--out>/export)", metavar="DIR")
    no_device_export: bool = c.option(False, "skip the on-device training export and its LiteRT steps (without "
                                      "it, a model whose training graph does not lower to TFLite builtins is an "
                                      "error, exit 2)")
    seed: int = c.seed_field()
    quiet: bool = c.quiet_field()

    def __post_init__(self):
        c.check_config(self)


def _bnn_data(config):
    """``((x, y), (x_test, y_test))`` as ``train_bnn`` loads them (inputs scaled to [-1, 1],
    int32 labels), for the exports and the device; c.ConfigError for a bad dataset or size."""
    from keras_coherence import data
    from keras_coherence.binary.training import scale_inputs

    try:
        (x, y), (x_test, y_test) = data.load_dataset(config.dataset, max_examples=config.max_train, seed=config.seed)
    except data.DatasetNotAvailableError as err:
        raise c.ConfigError(f"--dataset {config.dataset}: {str(err).splitlines()[0]}") from err
    except (ValueError, ImportError) as err:
        raise c.ConfigError(f"--dataset {config.dataset}: {err}") from err
    if len(x_test) == 0:
        raise c.ConfigError(f"--dataset {config.dataset}: the test split is empty; the accuracies need it.")
    if config.batch_size > len(x):
        raise c.ConfigError(f"--batch-size {config.batch_size} is larger than the {len(x)} training examples "
                         "(the on-device runner trains on full batches only).")
    return (scale_inputs(x), y.astype(np.int32)), (scale_inputs(x_test), y_test.astype(np.int32))


def _bnn_model_kwargs(config, input_shape, num_classes):
    """The builder kwargs ``train_bnn`` gets; builds the model once so that a model that does
    not fit the data fails before training."""
    from keras_coherence.binary.models import build_binary_model

    kwargs = c.hidden_kwargs(config)
    try:
        build_binary_model(config.model, config.method, input_shape=input_shape, num_classes=num_classes, **kwargs)
    except ValueError as err:
        shape = "x".join(map(str, input_shape))
        hint = "" if config.model == "mlp" else (
            "; the conv models are built for 32x32 images and train_bnn trains on the images as loaded "
            "(no padding): use --model mlp or binarynet, or a 32x32 dataset")
        reason = str(err).strip().splitlines()[0].rstrip(".")
        raise c.ConfigError(f"--model {config.model} does not fit the {shape} inputs of --dataset {config.dataset} "
                         f"({reason}){hint}.") from err
    return kwargs


def _bnn_memory(config, input_shape, num_classes, kwargs):
    """Modelled training memory (``memory_profile``) of standard training and of ``config.method``
    at ``config.batch_size``: ``(summary dict, per-layer CSV rows)``."""
    from keras_coherence.binary.memory import memory_profile

    profiles = {m: memory_profile(config.model, config.batch_size, m, config.optimizer, input_shape=input_shape,
                                  num_classes=num_classes, **kwargs)
                for m in dict.fromkeys(("standard", config.method))}
    bits = {m: p.totals() for m, p in profiles.items()}
    mib = {m: {k: v / 8 / 2 ** 20 for k, v in t.items()} for m, t in bits.items()}
    summary = {"batch_size": config.batch_size, "optimizer": config.optimizer, "optimizer_bits": 32,
               "bits": bits, "mib": mib, "ratio": bits["standard"]["peak"] / bits[config.method]["peak"]}
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


def keras_adam_state(module, optimizer):
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
    """``edge.runner`` (the device side); c.ConfigError when the package is not importable."""
    try:
        from edge import runner
    except ImportError as err:
        raise c.ConfigError(f"the device runner 'edge' is not importable ({err}); run from the repository "
                         "root or reinstall the package") from err
    return runner


def _bnn_device_steps(runner, path, train, test, config):
    """Runs ``config.device_steps`` training steps of the exported training model in LiteRT on
    the batches ``python -m edge train --seed SEED`` starts with; returns the device report."""
    (x, y), (x_test, y_test) = train, test
    device = runner.TrainingModel(path)
    before = device.infer(x_test)
    batches, epoch = [], 1
    while len(batches) < config.device_steps:
        batches += runner.epoch_batches(len(x), config.batch_size, config.seed, epoch)
        epoch += 1
    losses = [device.train_step(x[idx], y[idx]) for idx in batches[:config.device_steps]]
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


def run(config: Config, out_dir: str, log: Callable[[str], None] = print) -> c.Summary:
    """Train a binary network (``train_bnn``: ``config.model``, ``config.method``,
    ``config.optimizer``), model its training memory against standard training
    (``memory_profile``), export it for LCE inference (``export_lce``: size against a
    float TFLite file, Keras/LCE agreement) and as a builtin-only on-device training model
    (``export_training``), and run ``config.device_steps`` training steps of that model in
    LiteRT (``edge.runner``). Writes ``summary.json`` and ``memory.csv`` to ``out_dir`` and
    ``model_lce.tflite``, ``model_train.tflite``, ``train.npz`` and ``test.npz`` to
    ``config.export`` (default ``out_dir/export``); returns the summary dict, whose
    ``edge_commands`` are the ``python -m edge`` command lines for those files.

    The training model of a conv model trains on batches of exactly ``config.batch_size``
    (its convolution backward needs a fixed batch). A model whose training graph does not
    lower to TFLite builtins (e.g. the standard, autodiff-trained conv models need
    ``Conv2DBackpropFilter``), or whose Keras Adam state cannot be carried over, is an
    error: :class:`~keras_coherence.workflows.ConfigError` is raised (exit status 2) after ``summary.json`` is written
    with ``summary["device"]["error"]`` (the command line then drops the staged run and
    keeps the previous ``--out``); ``no_device_export=True`` skips
    that stage instead (``summary["device"]["skipped"]``). Raises :class:`~keras_coherence.workflows.ConfigError` for
    bad options.
    """
    import shlex

    from keras_coherence.binary import export_lce, export_training
    from keras_coherence.binary.training import train_bnn
    from keras_coherence.workflows.experiments import write_csv

    start = time.perf_counter()
    runner = _edge_runner()
    train, test = _bnn_data(config)
    (x, y), (x_test, y_test) = train, test
    num_classes = int(max(y.max(), y_test.max())) + 1
    input_shape = tuple(x.shape[1:])
    kwargs = _bnn_model_kwargs(config, input_shape, num_classes)
    export_dir = config.export or os.path.join(out_dir, "export")

    log(f"bnn: {config.model} ({config.method}) on {config.dataset}, {len(x)} training / {len(x_test)} test examples; "
        f"{config.optimizer} lr {config.lr:g}, batch {config.batch_size}, {c.epochs_text(config.epochs)}")
    try:
        result = train_bnn(config.model, config.method, epochs=config.epochs, batch_size=config.batch_size,
                           optimizer=config.optimizer, learning_rate=config.lr, dataset=config.dataset,
                           max_examples=config.max_train, seed=config.seed, verbose=0 if config.quiet else 1, **kwargs)
    except ValueError as err:
        raise c.ConfigError(str(err).strip().splitlines()[0]) from err
    model = result.model
    log(f"  test accuracy {result.test_accuracy:.3f} (train {result.summary()['train_accuracy']:.3f}); "
        f"{result.seconds:.1f} s of training")

    memory, memory_rows = _bnn_memory(config, input_shape, num_classes, kwargs)
    for line in _bnn_memory_lines(memory, config.method):
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
    if config.no_device_export:
        device = {"file": None, "error": None, "skipped": "--no-device-export"}
        log("  on-device training model: skipped (--no-device-export)")
    else:
        try:
            # convolutions' hand-written filter gradients lower to builtins only with a fixed batch
            batch = None if config.model == "mlp" else config.batch_size
            module = export_training.TrainingModule(model, learning_rate=config.lr, batch_size=batch)
            adam = keras_adam_state(module, model.optimizer)
            if adam is not None:  # the device continues Keras's Adam where it stopped
                module.assign({**module.weights(), **adam})
            train_model = export_training.to_training_tflite(module)
        except ValueError as err:
            export_error = str(err).strip().splitlines()[0]
            device = {"file": None, "error": str(err), "skipped": None}
            log(f"  on-device training model: failed: {export_error[:300]}")
    if device is None:  # exported: the device steps
        with open(paths["model_train.tflite"], "wb") as f:
            f.write(train_model)
        device = _bnn_device_steps(runner, paths["model_train.tflite"], train, test, config)
        keras_logits = model.predict(x_test, batch_size=1024, verbose=0)
        device.update(file=paths["model_train.tflite"], bytes=len(train_model), error=None, skipped=None,
                      adam_moments="from Keras" if adam is not None else "fresh",
                      keras_max_abs_diff=float(np.abs(device.pop("logits_before") - keras_logits).max()))
        log(f"  on-device training model: {len(train_model) / 1024:.0f} kB, signatures "
            f"{', '.join(device['signatures'])}; test accuracy {device['accuracy_before']:.3f} (max |logit "
            f"difference| to Keras {device['keras_max_abs_diff']:.2g})")
        log(f"  {device['steps']} on-device steps in LiteRT (Adam lr {config.lr:g}, {device['adam_moments']} "
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
                            "--epochs", config.epochs, "--batch-size", config.batch_size, "--seed", config.seed,
                            "--checkpoint-dir", checkpoints]),
            "infer": quote(["python", "-m", "edge", "infer", paths["model_train.tflite"], "--data", paths["test.npz"],
                            "--weights", os.path.join(checkpoints, f"epoch_{config.epochs:04d}.npz")]),
        }
    write_csv(os.path.join(out_dir, "memory.csv"), memory_rows)
    files = {"summary": "summary.json", "memory_csv": "memory.csv", "lce_model": paths["model_lce.tflite"],
             "training_model": device["file"], "train_data": paths["train.npz"], "test_data": paths["test.npz"]}
    summary = c.Summary({
        "command": "bnn",
        "config": c.config_dict(config),
        "data": {"dataset": config.dataset, "num_train": len(x), "num_test": len(x_test), "num_classes": num_classes,
                 "input_shape": list(input_shape), "input_range": [-1.0, 1.0]},
        "model": {"name": config.model, "method": result.method, "parameters": int(model.count_params())},
        "training": {"optimizer": config.optimizer, "lr": config.lr, "epochs": config.epochs,
                     "batch_size": config.batch_size, "steps_per_epoch": math.ceil(len(x) / config.batch_size)},
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
    })
    summary.write(out_dir)
    if export_error is not None:  # the summary (with the error) is written; the run failed
        raise c.ConfigError(f"on-device training export of --model {config.model} --method {config.method} failed: "
                         f"{export_error} (pass --no-device-export to skip this stage)")
    if edge_commands:
        log("  train it on the device (LiteRT + numpy only), then evaluate its checkpoint:")
        log(f"    {edge_commands['train']}")
        log(f"    {edge_commands['infer']}")
    log(f"  {summary['wall_seconds']['total']:.1f} s; wrote {os.path.join(out_dir, '')}{{summary.json, memory.csv}} "
        f"and {os.path.join(export_dir, '')}{{{', '.join(n for n in paths if n != 'model_train.tflite' or device['file'])}}}")
    return summary
