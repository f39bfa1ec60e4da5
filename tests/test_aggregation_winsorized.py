"""Every way Winsorized computes its clipped sum, against numpy sort + clip.

The paths (see ``keras_coherence/aggregation/aggregators.py``): ``c = 0`` is a plain
sum; a selection network of the exact batch size when the batch size is known while
tracing (<= 128 examples, c + 1 <= 8, float32); with a batch size known only at run
time, the network of the bucket (16/32/64/128) the size falls in -- exact when it is
the bucket size, else padded, with rows beyond the batch masked (the lower bound of
the bucket below makes the first leaves always full); ``tf.math.top_k`` otherwise.
A spy on the module records which path each call took, so the sizes below are known
to reach every one of them.
"""
import numpy as np
import pytest

import keras_coherence as kc  # noqa: F401
from keras_coherence._keras import tf
from keras_coherence.aggregation import aggregators as agg
from keras_coherence.aggregation import Winsorized


def np_winsorized_sum(g, c):
    """Sort each coordinate over examples, clip the c extremes on each side, sum."""
    s = np.sort(g, axis=0)
    return np.clip(g, s[c], s[len(g) - 1 - c]).sum(0)


def _values(n, shape, seed):
    """Normal values, half of them rounded to one decimal (many exact ties)."""
    g = np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")
    g[:, ::2] = np.round(g[:, ::2], 1)
    return g


@pytest.fixture
def paths(monkeypatch):
    """The paths taken: ("network", kind, size, c, static, lower) and ("top_k",)."""
    taken = []
    network, top_k = agg._network, agg.Winsorized._reduce_top_k

    def network_spy(kind, size, c, static, lower=0):
        taken.append(("network", kind, size, c, static, lower))
        return network(kind, size, c, static, lower)

    def top_k_spy(self, per_example, c):
        taken.append(("top_k",))
        return top_k(self, per_example, c)

    monkeypatch.setattr(agg, "_network", network_spy)
    monkeypatch.setattr(agg.Winsorized, "_reduce_top_k", top_k_spy)
    return taken


def _expected_static_path(n, c, kind):
    if c == 0:
        return []  # a plain sum (a matmul for outer products)
    if c + 1 <= 8 and n <= 128:
        return [("network", kind, n, c, True, 0)]
    return [("top_k",)]


# Compiling a network of 100 or 128 examples takes seconds per c, so at those sizes
# the default path is run for some c and top_k (use_network off) for every c.
NETWORK_C = {37: range(10), 100: (0, 1, 4, 7, 8, 9), 128: (0, 2, 5, 7, 8, 9), 129: range(10), 200: range(10)}


@pytest.mark.parametrize("n", sorted(NETWORK_C))
def test_reduce_every_c_matches_sort_and_clip(n, paths):
    g = _values(n, (3, 4), seed=n)
    for c in range(10):
        expected = np_winsorized_sum(g.astype(np.float64), c)
        top_k_only = Winsorized(c=c)
        top_k_only.use_network = False
        paths.clear()
        np.testing.assert_allclose(top_k_only.reduce(tf.constant(g)).numpy(), expected, rtol=1e-5, atol=5e-5,
                                   err_msg=f"top_k n={n} c={c}")
        assert paths == [("top_k",)]
        if c in NETWORK_C[n]:
            paths.clear()
            out = Winsorized(c=c).reduce(tf.constant(g)).numpy()
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=5e-5, err_msg=f"n={n} c={c}")
            assert paths == _expected_static_path(n, c, "rows"), (n, c)


@pytest.mark.parametrize("n", [37, 128, 200])
def test_reduce_outer_matches_sort_and_clip_of_outer_products(n, paths):
    rng = np.random.default_rng(n)
    a = _values(n, (4,), seed=n + 1)
    dz = rng.normal(size=(n, 3)).astype("float32")
    outer = np.einsum("bi,bj->bij", a.astype(np.float64), dz.astype(np.float64))
    for c in (0, 2, 7, 9):
        paths.clear()
        out = Winsorized(c=c).reduce_outer(tf.constant(a), tf.constant(dz)).numpy()
        np.testing.assert_allclose(out, np_winsorized_sum(outer, c), rtol=1e-5, atol=5e-5, err_msg=f"c={c}")
        assert paths == _expected_static_path(n, c, "outer"), (n, c)


# (batch, bucket, lower bound): a batch known only at run time, padded into its bucket
PADDED = [(29, 32, 16), (37, 64, 32), (100, 128, 64)]


def _check_dynamic(function, n, c, seed):
    g = _values(n, (5,), seed=seed)
    np.testing.assert_allclose(function(tf.constant(g)).numpy(), np_winsorized_sum(g.astype(np.float64), c),
                               rtol=1e-5, atol=5e-5, err_msg=f"n={n} c={c}")


@pytest.mark.parametrize("c", [5, 6, 7])
def test_dynamic_batch_padded_buckets(c, paths):
    """Every c at the buckets of 32 and 64; at c = 7 also the bucket of 128, a bucket's
    own size (no padding), more examples than the largest bucket (top_k) and the
    outer-product networks of the buckets of 32 and 64 (tracing and compiling more
    networks takes tens of seconds).
    switch_case traces every bucket's branch, so the spy shows the networks exist; the
    numbers check the one that ran."""
    w = Winsorized(c=c)
    rows = tf.function(w.reduce, input_signature=[tf.TensorSpec([None, 5], tf.float32)])
    for n, bucket, lower in PADDED if c == 7 else PADDED[:2]:
        _check_dynamic(rows, n, c, seed=10 * n + c)
        assert ("network", "rows", bucket, c, False, lower) in paths
    if c != 7:
        return
    for n in (64, 200):
        _check_dynamic(rows, n, c, seed=n)
    assert ("network", "rows", 64, c, True, 0) in paths and ("top_k",) in paths
    outer = tf.function(w.reduce_outer, input_signature=[tf.TensorSpec([None, 4], tf.float32),
                                                         tf.TensorSpec([None, 3], tf.float32)])
    for n, bucket, lower in PADDED[:2]:
        a, dz = _values(n, (4,), seed=n), np.random.default_rng(n).normal(size=(n, 3)).astype("float32")
        expected = np_winsorized_sum(np.einsum("bi,bj->bij", a.astype(np.float64), dz.astype(np.float64)), c)
        np.testing.assert_allclose(outer(tf.constant(a), tf.constant(dz)).numpy(), expected,
                                   rtol=1e-5, atol=5e-5, err_msg=f"n={n}")
        assert ("network", "outer", bucket, c, False, lower) in paths


@pytest.mark.parametrize("n", [37, 128, 200])
def test_percentile_form_static_and_dynamic(n, paths):
    g = _values(n, (7,), seed=n + 3)
    dynamic_rows = {}
    for p in (0, 1, 3, 10, 25, 49):
        c = int(np.round(p / 100 * (n - 1)))  # nearest-rank percentiles p and 100 - p
        lo, hi = np.percentile(g, [p, 100 - p], axis=0, method="nearest")
        w = Winsorized(percentile=p)
        paths.clear()
        out = w.reduce(tf.constant(g)).numpy()
        np.testing.assert_allclose(out, np_winsorized_sum(g.astype(np.float64), c), rtol=1e-5, atol=5e-5)
        np.testing.assert_allclose(out, np.clip(g.astype(np.float64), lo, hi).sum(0), rtol=1e-5, atol=5e-5)
        assert paths == _expected_static_path(n, c, "rows"), (p, c)
        # Batch size known only at run time: c is computed in the graph, top_k is used.
        paths.clear()
        dynamic_rows[p] = tf.function(w.reduce, input_signature=[tf.TensorSpec([None, 7], tf.float32)])
        out = dynamic_rows[p](tf.constant(g)).numpy()
        np.testing.assert_allclose(out, np_winsorized_sum(g.astype(np.float64), c), rtol=1e-5, atol=5e-5)
        assert paths == [("top_k",)], p


def test_float64_and_use_network_off_take_top_k(paths):
    g = _values(37, (3,), seed=1)
    out = Winsorized(c=3).reduce(tf.constant(g.astype(np.float64))).numpy()
    np.testing.assert_allclose(out, np_winsorized_sum(g.astype(np.float64), 3), rtol=1e-12, atol=1e-12)
    assert paths == [("top_k",)]
    paths.clear()
    w = Winsorized(c=3)
    w.use_network = False
    np.testing.assert_allclose(w.reduce(tf.constant(g)).numpy(), np_winsorized_sum(g.astype(np.float64), 3),
                               rtol=1e-5, atol=5e-5)
    assert paths == [("top_k",)]
