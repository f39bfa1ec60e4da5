"""One call to train a binary network standard or low-memory (for scripts and the CLI).

>>> result = train_bnn("mlp", "low_memory", epochs=1, batch_size=50, max_examples=100,
...                    hidden=(16,))
>>> sorted(result.summary())[:4]
['batch_size', 'dataset', 'epochs', 'method']
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np

from keras_coherence._keras import keras, tf
from keras_coherence.binary.config import method_name, resolve_method
from keras_coherence.binary.models import build_binary_model

__all__ = ["make_optimizer", "OPTIMIZERS", "optimizer_slots", "train_bnn", "TrainResult",
           "scale_inputs"]

#: Names accepted by :func:`make_optimizer`.
OPTIMIZERS = ("adam", "bop", "sgd")


def _check_optimizer(name):
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}.")
    return key


def make_optimizer(name: str = "adam", learning_rate: float = 1e-3,
                   bop_threshold: float = 1e-8, bop_gamma: float = 1e-4):
    """``"adam"`` (the paper's), ``"sgd"``, or ``"bop"``: larq's latent-free Bop on the
    binary kernels (variables with ``precision == 1``) and Adam on everything else,
    through ``larq.optimizers.CaseOptimizer`` (larq's optimizers are Keras-2 legacy
    optimizers, so Adam is the legacy one there)."""
    key = _check_optimizer(name)
    if key == "adam":
        return keras.optimizers.Adam(learning_rate)
    if key == "sgd":
        return keras.optimizers.SGD(learning_rate)
    import larq as lq
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable,
         lq.optimizers.Bop(threshold=bop_threshold, gamma=bop_gamma)),
        default_optimizer=keras.optimizers.legacy.Adam(learning_rate))


def optimizer_slots(name: str, binary_kernel: bool) -> int:
    """Optimizer state tensors per weight: Adam 2, SGD 0, Bop 1 on binary kernels (and
    Adam's 2 on the other weights)."""
    key = _check_optimizer(name)
    if key == "sgd":
        return 0
    if key == "bop" and binary_kernel:
        return 1
    return 2


def scale_inputs(x):
    """Images in ``[0, 1]`` to the paper's ``[-1, 1]``."""
    return (np.asarray(x, np.float32) * 2.0 - 1.0).astype(np.float32)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_bnn` returns."""

    model: keras.Model
    history: keras.callbacks.History
    method: str
    model_name: str
    optimizer: str
    epochs: int
    batch_size: int
    dataset: str
    test_loss: float
    test_accuracy: float
    seconds: float

    def summary(self) -> dict:
        """The figures as a plain dict (no model, no history)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("model", "history")}
        out["train_accuracy"] = float(self.history.history["accuracy"][-1])
        return out


def train_bnn(model_name: str = "mlp", method="low_memory", epochs: int = 10,
              batch_size: int = 100, optimizer: str = "adam", learning_rate: float = 1e-3,
              dataset: str = "embedded_mnist", max_examples: Optional[int] = None,
              seed: int = 0, verbose: int = 0, **model_kwargs) -> TrainResult:
    """Train a binary model on a dataset and evaluate it on the test split.

    Inputs are scaled to ``[-1, 1]``; the loss is sparse categorical cross-entropy on
    logits. ``model_kwargs`` go to the builder (e.g. ``hidden=(64,)``,
    ``dense_as_conv=True``).

    Raises:
        ValueError: unknown model, method or optimizer, or bad sizes.
    """
    from keras_coherence.data import load_dataset

    config = resolve_method(method)
    _check_optimizer(optimizer)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    (x, y), (x_test, y_test) = load_dataset(dataset, max_examples=max_examples, seed=seed)
    x, x_test = scale_inputs(x), scale_inputs(x_test)
    num_classes = int(max(y.max(), y_test.max())) + 1
    tf.keras.utils.set_random_seed(seed)
    model = build_binary_model(model_name, config if config is not None else "standard",
                               input_shape=x.shape[1:], num_classes=num_classes, **model_kwargs)
    model.compile(make_optimizer(optimizer, learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                        shuffle=True)
    seconds = time.perf_counter() - start
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=batch_size,
                                              verbose=0)
    return TrainResult(model=model, history=history, method=method_name(method),
                       model_name=model_name, optimizer=optimizer, epochs=epochs,
                       batch_size=batch_size, dataset=dataset, test_loss=float(test_loss),
                       test_accuracy=float(test_accuracy), seconds=seconds)
