"""Train in float, then quantization-aware with power-of-two (PO2) weight quantizers
while a :class:`~keras_coherence.quantization.ScaleMonitor` records the scales; export
an integer TFLite model and compare the float, quantized (Keras) and TFLite accuracy.

>>> from keras_coherence.workflows import quantize
>>> summary = quantize.run(quantize.Config(model="mlp", bits=4, max_train=500), "runs/quantize")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Tuple

from keras_coherence.workflows import _common as c

__all__ = ["Config", "METHODS", "run"]

HELP = "train in float, then quantization-aware with power-of-two weight scales; export integer TFLite"


def _methods():
    """The registered quantizers' short names (``quantizers.register``) and ``tfmot8``."""
    from keras_coherence.quantization.quantizers import ALIASES, METHODS as registered

    short = [m for m in registered if m not in ALIASES]
    covered = {registered[m] for m in short}  # a quantizer with a short name is listed once
    return short + [a for a in ALIASES if a not in covered] + ["tfmot8"]


#: The ``method`` choices, read when checked.
METHODS = c.Choices(_methods)


@dataclasses.dataclass
class Config:
    """Train a model in float, then quantization-aware (tfmot QAT, batch norm folded)
    with power-of-two (PO2) weight quantizers while ScaleMonitor records every
    layer's exponents, exponent flips, clip fraction and MSQE; export an integer
    TFLite model and report the float, quantized (Keras) and TFLite test accuracy and
    whether every exported weight scale is an exact power of two. Writes
    quantize.csv, quantize.png, model.tflite and summary.json to --out."""

    dataset: str = c.dataset_field()
    data_dir: Optional[str] = c.data_dir_field()
    hidden: Optional[Tuple[int, ...]] = c.hidden_field()
    batch_size: int = c.batch_size_field()
    lr: float = c.lr_field()
    max_train: Optional[int] = c.max_train_field()
    seed: int = c.seed_field()
    quiet: bool = c.quiet_field()
    model: str = c.option("small_cnn", "model architecture; the MobileNets get the images zero-padded to 32x32x3",
                          choices=c.FLOAT_MODEL_CHOICES)
    alpha: Optional[float] = c.option(None, "width multiplier of the MobileNets (default 0.25 for v1, 0.35 for v2)",
                                      check=c.positive_float)
    method: str = c.option("msqe", "PO2 weight quantizer: 'msqe_baseline' (QKeras auto_po2), 'msqe' (MSQE with "
                           "the paper's fixes), 'learned' (learned log2-scale); or 'tfmot8', tfmot's default 8-bit "
                           "QAT (float scales, a reference)", choices=METHODS)
    bits: Optional[int] = c.option(None, "weight bits (default 4; tfmot8 is 8-bit)", check=int, choices=range(2, 9),
                                   metavar="{2..8}")
    per_channel: bool = c.option(True, "one exponent per output channel of Conv2D / DepthwiseConv2D (Dense "
                                 "kernels are always per tensor)")
    float_epochs: int = c.option(2, "epochs of float training", check=c.positive_int)
    qat_epochs: int = c.option(1, "epochs of quantization-aware training", check=c.positive_int)
    qat_lr: Optional[float] = c.option(None, "SGD learning rate of the QAT epochs (default: --lr / 10)",
                                       check=c.positive_float)
    every_n_steps: int = c.option(1, "ScaleMonitor records the PO2 scales every N QAT steps",
                                  check=c.positive_int, metavar="N")

    def __post_init__(self):
        c.check_config(self)


def _float_model(config, input_shape, num_classes):
    if config.alpha is None:
        return c.build_float_model(config, input_shape, num_classes)
    if not config.model.startswith("mobilenet"):
        raise c.ConfigError("--alpha only applies to --model mobilenet_v1 / mobilenet_v2.")
    return c.build_float_model(config, input_shape, num_classes, alpha=config.alpha)


def run(config: Config, out_dir: str, log: Callable[[str], None] = print) -> c.Summary:
    """Train ``config.model`` in float, then quantization-aware with PO2 weight quantizers
    (``quantize_model``, ``config.method``, ``config.bits``) while a ScaleMonitor records
    the scales; export an integer TFLite file and compare the float, quantized Keras and
    TFLite accuracy on the test set. Writes ``quantize.csv`` (the monitor's rows),
    ``quantize.png``, ``model.tflite`` and ``summary.json`` to ``out_dir``; returns the
    summary. With ``method="tfmot8"`` tfmot's default 8-bit scheme replaces the PO2
    quantizers (no monitor, no CSV or plot). Raises :class:`ConfigError` for bad options."""
    from keras_coherence import models
    from keras_coherence._keras import keras

    start = time.perf_counter()
    tfmot8 = config.method == "tfmot8"
    if tfmot8 and config.bits not in (None, 8):
        raise c.ConfigError(f"--method tfmot8 quantizes to 8 bits; drop --bits {config.bits} or pick a PO2 method.")
    bits = 8 if tfmot8 else (config.bits or 4)
    qat_lr = config.qat_lr if config.qat_lr is not None else config.lr / 10
    keras.utils.set_random_seed(config.seed)
    (x_train, y_train), (x_test, y_test), num_classes, input_shape = c.load_data(config)
    if len(x_test) == 0:
        raise c.ConfigError(f"--dataset {config.dataset}: the test split is empty; the accuracies need it.")
    if config.model.startswith("mobilenet") and len(input_shape) == 3 and (
            min(input_shape[:2]) < 32 or input_shape[2] == 1):
        size = max(32, *input_shape[:2])
        try:
            x_train, x_test = models.pad_images(x_train, size), models.pad_images(x_test, size)
        except ValueError as err:
            raise c.ConfigError(f"--model {config.model}: {err}") from err
        input_shape = tuple(x_train.shape[1:])
    n = len(x_train)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    float_model = _float_model(config, input_shape, num_classes)
    float_model.compile(keras.optimizers.SGD(config.lr), loss, metrics=["accuracy"])
    steps_per_epoch = math.ceil(n / config.batch_size)
    scheme = "tfmot's default 8-bit QAT" if tfmot8 else (
        f"{bits}-bit {config.method} PO2 weights (one exponent per "
        f"{'conv output channel, per Dense kernel' if config.per_channel else 'kernel'})")
    log(f"quantize: {config.model} ({float_model.count_params():,} parameters) on {config.dataset}, {n} training "
        f"examples, batch {config.batch_size}; float: {c.epochs_text(config.float_epochs)} "
        f"SGD lr {config.lr}; QAT: {scheme}, 8-bit activations, {c.epochs_text(config.qat_epochs)} "
        f"SGD lr {qat_lr:g}")
    verbose = 0 if config.quiet else 1
    t0 = time.perf_counter()
    float_model.fit(x_train, y_train, batch_size=config.batch_size, epochs=config.float_epochs, shuffle=True,
                    verbose=verbose)
    float_seconds = time.perf_counter() - t0
    _, float_acc = float_model.evaluate(x_test, y_test, batch_size=1024, verbose=0)

    from keras_coherence.quantization.evaluate import qat_evaluate

    try:
        result = qat_evaluate(float_model, (x_train, y_train), (x_test, y_test), method=config.method, bits=bits,
                              per_channel=config.per_channel, qat_epochs=config.qat_epochs,
                              optimizer=keras.optimizers.SGD(qat_lr), batch_size=config.batch_size,
                              every_n_steps=config.every_n_steps, verbose=verbose)
    except ValueError as err:
        raise c.ConfigError(str(err)) from err
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
            title=f"{bits}-bit {config.method} PO2 scales during QAT: {config.model} on {config.dataset}"))
    summary = c.Summary({
        "command": "quantize",
        "config": c.config_dict(config),
        "data": {"dataset": config.dataset, "num_train": n, "num_test": int(len(x_test)),
                 "num_classes": num_classes, "input_shape": list(input_shape)},
        "model": {"name": config.model, "parameters": int(float_model.count_params())},
        "quantization": {"method": config.method, "bits": bits, "per_channel": bool(config.per_channel),
                         "activation_bits": 8},
        "training": {"float_epochs": config.float_epochs, "qat_epochs": config.qat_epochs,
                     "steps_per_epoch": steps_per_epoch, "qat_steps": steps_per_epoch * config.qat_epochs,
                     "qat_step_ms_median": result["step_ms"],
                     "lr": config.lr, "qat_lr": qat_lr},
        "accuracy": accuracy,
        "tflite": tflite_info,
        "logit_steps": result["logit_steps"],
        "litert_rounding": result["litert_rounding"],
        "scales": scales,
        "wall_seconds": {"total": time.perf_counter() - start, "float_training": float_seconds,
                         "qat": qat_seconds, "export": export_seconds},
        "files": files,
    })
    summary.write(out_dir)

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
