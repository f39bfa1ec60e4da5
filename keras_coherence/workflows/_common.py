"""What the workflows share: config fields that describe themselves (help text and a
value check, read by the command line too), the error type for a bad config, the
summary object, and data/model loading with errors that name the option at fault."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

__all__ = ["ConfigError", "Summary", "check_config", "fraction", "option", "positive_float", "positive_int",
           "widths"]


class ConfigError(ValueError):
    """A config value the run cannot use. The message names the option the way the
    command line spells it (``--max-train`` is the field ``max_train``) and says what
    to use instead; the command line prints it as a one-line usage error (exit 2)."""


# ------------------------------------------------------------ value checks (also argparse types)
def positive_int(value) -> int:
    """``value`` (an int or its text) if it is an integer >= 1, else ValueError."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{value!r} must be a positive integer")
    return int(value)


def positive_float(value) -> float:
    """``value`` (a number or its text) if it is finite and > 0, else ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{value!r} must be a positive number")
    return number


def fraction(value) -> float:
    """``value`` if it is a number in [0, 1], else ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{value!r} must be a fraction in [0, 1] (e.g. 0.25 for 25% of the labels)")
    return number


def widths(value) -> tuple:
    """Layer widths from ``"512,512"`` or a sequence of ints; ValueError if not positive ints."""
    try:
        values = tuple(int(v) for v in (value.replace(" ", "").split(",") if isinstance(value, str) else value)
                       if v != "")
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} must be comma-separated layer widths, e.g. 512,512") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{value!r} must be comma-separated positive layer widths, e.g. 512,512")
    return values


class Choices:
    """Choices read when they are checked (a builder or quantizer registered after this
    module loaded is accepted): ``names()`` lists them for ``--help`` and errors,
    ``accepts(name)`` (default: ``name in names()``) decides membership."""

    def __init__(self, names: Callable[[], list], accepts: Optional[Callable[[str], bool]] = None):
        self._names, self._accepts = names, accepts

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name):
        return self._accepts(name) if self._accepts is not None else name in self._names()


def _float_models():
    from keras_coherence.models import FLOAT_MODELS
    return FLOAT_MODELS


def _binary_models():
    from keras_coherence.binary.models import BINARY_MODELS
    return BINARY_MODELS


#: The registered float / binary model builders (``models.register``, ``binary.models.register``).
FLOAT_MODEL_CHOICES = Choices(lambda: list(_float_models()), lambda name: name in _float_models())
BINARY_MODEL_CHOICES = Choices(lambda: list(_binary_models()), lambda name: name in _binary_models())


def option(default=dataclasses.MISSING, help: str = "", *, check: Optional[Callable] = None, choices=None,
           metavar: Optional[str] = None, flag: Optional[str] = None, action: Optional[str] = None,
           required: bool = False):
    """A config field with its documentation: ``help`` (also the ``--help`` text),
    ``check`` (a function returning the normalized value or raising ValueError; also the
    argparse type), ``choices`` (any container, read when checked), ``flag`` (the
    command-line spelling when it is not ``--field-name``), ``required`` (no usable
    default: the run checks it is set). Fields without ``help`` are not command-line options."""
    metadata = {"help": help, "check": check, "choices": choices, "metavar": metavar, "flag": flag, "action": action,
                "required": required}
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def check_config(config) -> None:
    """Check and normalize every field of ``config`` that has a ``check`` or ``choices``
    (dataclasses call this from ``__post_init__``); ConfigError names the option."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None or isinstance(value, bool):
            continue
        check, choices = field.metadata.get("check"), field.metadata.get("choices")
        try:
            if check is not None:
                value = check(value)
                object.__setattr__(config, field.name, value)
            if choices is not None and value not in choices:
                raise ValueError(f"invalid choice {value!r} (choose from {', '.join(map(str, choices))})")
        except ValueError as err:
            raise ConfigError(f"{flag_of(field)}: {err}") from None


class Summary(dict):
    """A workflow's result: a JSON-ready dict (what ``summary.json`` holds), with
    :meth:`write` to put it in a folder."""

    def write(self, out_dir: str) -> str:
        """Add the package versions and write ``out_dir/summary.json``; return its path."""
        from keras_coherence import __version__
        from keras_coherence._keras import tf

        self["versions"] = {"keras_coherence": __version__, "tensorflow": tf.__version__,
                            "python": platform.python_version()}
        path = os.path.join(out_dir, "summary.json")
        with open(path, "w") as f:
            json.dump(self, f, indent=2)
            f.write("\n")
        return path


def config_dict(config) -> Dict[str, Any]:
    """The config as JSON values, sorted by name (the summary's ``config``)."""
    def jsonable(value):
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        return list(value) if isinstance(value, tuple) else value
    return {k: jsonable(v) for k, v in sorted(dataclasses.asdict(config).items())}


# ------------------------------------------------------------ data, models, text
def load_data(config):
    """``(x_train, y_train), (x_test, y_test), num_classes, input_shape`` of
    ``config.dataset`` (``data_dir``, ``max_train``); ConfigError for a bad name."""
    from keras_coherence import data

    try:
        x_train, y_train = data.load_dataset(config.dataset, split="train", data_dir=config.data_dir,
                                             max_examples=config.max_train)
        x_test, y_test = data.load_dataset(config.dataset, split="test", data_dir=config.data_dir)
        info = data.dataset_info(config.dataset, data_dir=config.data_dir)
    except data.DatasetNotAvailableError as err:
        raise ConfigError(f"--dataset {config.dataset}: {err} (On the command line: --data-dir DIR.)") from err
    except (ValueError, ImportError) as err:
        raise ConfigError(f"--dataset {config.dataset}: {err}") from err
    if len(x_train) == 0:
        raise ConfigError(f"--dataset {config.dataset}: the training split is empty.")
    num_classes = info.get("num_classes") or int(max(y_train.max(), y_test.max(initial=0)) + 1)
    return (x_train, y_train), (x_test, y_test), int(num_classes), tuple(x_train.shape[1:])


def noisy_labels(config, y_train, num_classes):
    """``(labels to train on, corrupted mask)`` after ``config.label_noise``."""
    from keras_coherence import data

    if config.label_noise <= 0:
        return y_train, np.zeros(len(y_train), bool)
    try:
        return data.corrupt_labels(y_train, config.label_noise, num_classes=num_classes, seed=config.seed,
                                   mode=config.noise_mode)
    except ValueError as err:
        raise ConfigError(f"--label-noise {config.label_noise}: {err}") from err


def hidden_kwargs(config) -> Dict[str, Any]:
    """``{"hidden": ...}`` for an MLP when ``hidden`` is set; refused for other models."""
    if config.hidden is None:
        return {}
    if config.model != "mlp":
        raise ConfigError("--hidden only applies to --model mlp.")
    return {"hidden": config.hidden}


def build_float_model(config, input_shape, num_classes, **kwargs):
    """``models.build_float_model(config.model, ...)`` with ``hidden``; ConfigError if it does not fit."""
    from keras_coherence import models

    try:
        return models.build_float_model(config.model, input_shape, num_classes, **{**hidden_kwargs(config), **kwargs})
    except ValueError as err:
        raise ConfigError(f"--model {config.model}: {err}") from err


def sgd_run_text(config, model, n: int, steps: int) -> str:
    """``"mlp (669,706 parameters) on embedded_mnist, 4000 training examples; SGD lr 0.1,
    batch 50, 5 epochs = 400 steps"`` (the label noise too, when there is some)."""
    return (f"{config.model} ({model.count_params():,} parameters) on {config.dataset}, {n} training "
            f"examples{noise_note(config)}; SGD lr {config.lr}, batch {config.batch_size}, "
            f"{epochs_text(config.epochs)} = {steps} steps")


def fit_seconds(model, x, y, config, callback) -> float:
    """Seconds of ``model.fit`` on ``x, y`` for ``config.epochs`` with ``callback``."""
    import time

    start = time.perf_counter()
    model.fit(x, y, batch_size=config.batch_size, epochs=config.epochs, shuffle=True, callbacks=[callback],
              verbose=0 if config.quiet else 1)
    return time.perf_counter() - start


def epochs_text(n: int) -> str:
    """``"1 epoch"`` / ``"3 epochs"``."""
    return f"{n} epoch{'s' if n != 1 else ''}"


def noise_note(config) -> str:
    """``", 50% label noise (uniform)"`` when the run corrupts labels, else ``""``."""
    return f", {config.label_noise:.0%} label noise ({config.noise_mode})" if config.label_noise else ""


# ------------------------------------------------------------ fields several workflows share
def dataset_field():
    return option("embedded_mnist", "'embedded_mnist' (offline, 4000 train / 1000 test) or any "
                  "tensorflow_datasets name already prepared under --data-dir")


def data_dir_field():
    return option(None, "tensorflow_datasets data directory")


def hidden_field(default_text="512,512"):
    return option(None, f"hidden widths of the mlp (default {default_text})", check=widths, metavar="W1,W2,..")


def max_train_field(note=""):
    return option(None, "use at most N training examples" + note, check=positive_int, metavar="N")


def seed_field():
    return option(0, "seed of weights, shuffling, label noise, probe", check=int)


def quiet_field():
    return option(False, "no progress bar")


def label_noise_field():
    return option(0.0, "fraction of training labels to corrupt (keras_coherence.data.corrupt_labels)",
                  check=fraction, metavar="FRACTION")


def noise_mode_field():
    return option("uniform", "how corrupted labels are drawn (see corrupt_labels)",
                  choices=("uniform", "random", "permute"))


def epochs_field(default=5):
    return option(default, "training epochs", check=positive_int)


def batch_size_field(default=100, help="SGD mini-batch size"):
    return option(default, help, check=positive_int)


def lr_field(default=0.1, help="SGD learning rate (no momentum)"):
    return option(default, help, check=positive_float)


@dataclasses.dataclass
class TrainingOptions:
    """The options of every workflow that trains a float model with SGD on a dataset
    (``coherence`` and ``aggregate`` add their own fields after these)."""

    dataset: str = dataset_field()
    data_dir: Optional[str] = data_dir_field()
    model: str = option("mlp", "model architecture (a registered float model builder)", choices=FLOAT_MODEL_CHOICES)
    hidden: Optional[Tuple[int, ...]] = hidden_field()
    epochs: int = epochs_field()
    batch_size: int = batch_size_field()
    lr: float = lr_field()
    label_noise: float = label_noise_field()
    noise_mode: str = noise_mode_field()
    max_train: Optional[int] = max_train_field()
    seed: int = seed_field()
    quiet: bool = quiet_field()

    def __post_init__(self):
        check_config(self)
