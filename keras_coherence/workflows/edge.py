"""The three steps around ``python -m edge`` for a binary network, each a config and a
``run`` returning a JSON-ready summary (the command line prints it as one JSON line):

* :func:`run_export` (``edge-export``) -- a fresh model's builtin-only on-device training
  model ``train.tflite`` plus ``train.npz`` / ``test.npz`` data;
* :func:`run_lce` (``edge-lce``) -- a device checkpoint loaded into the Keras model, then
  exported with Larq Compute Engine (``model_lce.tflite``), with Keras/LCE parity;
* :func:`run_keras_train` (``edge-keras-train``) -- the same batches trained by Keras
  ``train_on_batch``, timed and measured as ``python -m edge train`` measures.

>>> from keras_coherence.workflows import edge
>>> edge.run_export(edge.ExportConfig(out="runs/edge", max_examples=300))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Tuple

import numpy as np

from keras_coherence.workflows import _common as c

__all__ = ["ExportConfig", "KerasTrainConfig", "LceConfig", "run_export", "run_keras_train", "run_lce"]


@dataclasses.dataclass
class ModelConfig:
    """The binary network the three steps build (each builds it afresh)."""

    model: str = c.option("mlp", "binary network (keras_coherence.binary.models)")
    method: str = c.option("low_memory", "training method of the layers")
    hidden: Optional[Tuple[int, ...]] = c.option(None, "hidden widths of the mlp", check=c.widths,
                                                 metavar="W1,W2,..")
    dense_as_conv: bool = c.option(False, "write the binary Dense layers as 1x1 convolutions")
    seed: int = c.option(0, "initialization (and keras-train's shuffling) seed", check=int)
    learning_rate: float = c.option(1e-3, "Adam learning rate", check=c.positive_float)

    def __post_init__(self):
        c.check_config(self)

    def build(self):
        from keras_coherence._keras import keras
        from keras_coherence.binary.models import build_binary_model

        keras.utils.set_random_seed(self.seed)
        kwargs = {"hidden": self.hidden} if self.hidden else {}
        if self.dense_as_conv:
            kwargs["dense_as_conv"] = True
        return build_binary_model(self.model, self.method, **kwargs)


@dataclasses.dataclass
class ExportConfig(ModelConfig):
    """Write train.tflite (the builtin-only training model), train.npz and test.npz to --out."""

    out: str = c.option(None, "output directory", metavar="DIR", required=True)
    dataset: str = c.option("embedded_mnist", "dataset name (keras_coherence.data.load_dataset)")
    max_examples: Optional[int] = c.option(None, "use at most N training examples", check=c.positive_int,
                                           metavar="N")
    data_seed: int = c.option(0, "train/test split seed", check=int)
    fixed_batch: Optional[int] = c.option(None, "fixed train batch (needed with convolutions)",
                                          check=c.positive_int)


@dataclasses.dataclass
class LceConfig(ModelConfig):
    """Load a device checkpoint into the Keras model and export it with LCE."""

    weights: str = c.option(None, "a checkpoint .npz from python -m edge train", required=True)
    data: str = c.option(None, "an .npz with x, y (e.g. test.npz)", required=True)
    out: str = c.option(None, "output directory", metavar="DIR", required=True)
    parity_examples: int = c.option(200, "examples of the Keras/LCE comparison", check=c.positive_int)


@dataclasses.dataclass
class KerasTrainConfig(ModelConfig):
    """The same batches trained with Keras, measured like python -m edge."""

    data: str = c.option(None, "an .npz with x, y to train on", required=True)
    test: Optional[str] = c.option(None, "an .npz with x, y: report test accuracy after training")
    epochs: int = c.epochs_field(1)
    batch_size: int = c.batch_size_field(100, "mini-batch size")


def _required(config, *names):
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(config, n) is None]
    if missing:
        raise c.ConfigError(f"{', '.join(missing)} is required")


def run_export(config: ExportConfig) -> c.Summary:
    """Training model + data files for ``python -m edge``."""
    from keras_coherence.binary.export_training import TrainingModule, to_training_tflite
    from keras_coherence.binary.training import scale_inputs
    from keras_coherence.data import load_dataset

    _required(config, "out")
    os.makedirs(config.out, exist_ok=True)
    (x, y), (x_test, y_test) = load_dataset(config.dataset, max_examples=config.max_examples, seed=config.data_seed)
    np.savez(os.path.join(config.out, "train.npz"), x=scale_inputs(x), y=y.astype(np.int32))
    np.savez(os.path.join(config.out, "test.npz"), x=scale_inputs(x_test), y=y_test.astype(np.int32))
    module = TrainingModule(config.build(), learning_rate=config.learning_rate, batch_size=config.fixed_batch)
    flatbuffer = to_training_tflite(module)
    path = os.path.join(config.out, "train.tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return c.Summary(model=path, bytes=len(flatbuffer), state_tensors=len(module.state_names),
                     train_examples=len(x), test_examples=len(x_test))


def run_lce(config: LceConfig) -> c.Summary:
    """A device checkpoint into a fresh Keras model, then LCE and float TFLite files."""
    from keras_coherence.binary import export_lce
    from keras_coherence.binary.export_training import set_keras_weights

    _required(config, "weights", "data", "out")
    model = config.build()
    with np.load(config.weights) as data:
        set_keras_weights(model, {k: data[k] for k in data.files})
    with np.load(config.data) as data:
        x, y = data["x"], data["y"]
    lce_model = export_lce.to_lce(model)
    report = export_lce.compare(model, x[:config.parity_examples], lce_model=lce_model)
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "model_lce.tflite"), "wb") as f:
        f.write(lce_model)
    keras_accuracy = float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))
    lce_accuracy = float(np.mean(export_lce.lce_predict(lce_model, x).argmax(-1) == y))
    return c.Summary(lce_bytes=report.lce_bytes, float_bytes=report.float_bytes, size_ratio=report.size_ratio,
                     lce_ops=report.lce_ops, max_abs_diff=report.max_abs_diff,
                     argmax_agreement=report.argmax_agreement, lce_ms=report.lce_latency_s * 1e3,
                     float_ms=report.float_latency_s * 1e3, keras_accuracy=keras_accuracy,
                     lce_accuracy=lce_accuracy)


def run_keras_train(config: KerasTrainConfig) -> c.Summary:
    """Keras ``train_on_batch`` on the batches ``python -m edge train`` uses, timed and
    measured as it measures (median step, process peak RSS)."""
    from edge.runner import epoch_batches, load_data, peak_rss_mib
    from keras_coherence._keras import keras

    _required(config, "data")
    start = time.perf_counter()
    x, y = load_data(config.data)
    model = config.build()
    model.compile(keras.optimizers.Adam(config.learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses, times = [], []
    setup_rss = peak_rss_mib()
    for epoch in range(1, config.epochs + 1):
        for idx in epoch_batches(len(x), config.batch_size, config.seed, epoch):
            t0 = time.perf_counter()
            losses.append(float(model.train_on_batch(x[idx], y[idx])))
            times.append(time.perf_counter() - t0)
    out = c.Summary(command="keras-train", method=config.method, steps=len(times), final_loss=losses[-1],
                    median_step_ms=float(np.median(times) * 1e3), wall_s=time.perf_counter() - start,
                    setup_peak_rss_mib=setup_rss, peak_rss_mib=peak_rss_mib())
    if config.test is not None:
        x_test, y_test = load_data(config.test)
        out["test_accuracy"] = float(np.mean(model.predict(x_test, verbose=0).argmax(-1) == y_test))
    return out
