"""Aggregators: small composable objects that turn the examples of a batch into one
update direction, suppressing weak gradient directions (those supported by few
examples). The compiled optimizer -- any Keras optimizer -- then applies it.

* :class:`Mean` -- plain gradient descent.
* :class:`Winsorized` -- per coordinate, the ``c`` largest and ``c`` smallest
  per-example values are clipped to the next inner value before summing
  (Chatterjee, "Coherent Gradients", ICLR 2020); or a percentile form as in that
  paper's code.
* :class:`MedianOfMeans` -- M3: the coordinate-wise median of the means of ``groups``
  groups of examples (Zielinski, Krishnan & Chatterjee, "Weak and Strong Gradient
  Directions", 2020).

Strings work too: ``get("winsorized:c=4")``, ``get("m3")``, ``get("mean")``.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import numpy as np

from keras_coherence._keras import tf
from keras_coherence._registry import Registry, lowercase_name
from keras_coherence.coherence.step import in_replica_context as _in_replica_context


def integer_arg(value, owner, name, minimum):
    """``value`` as an ``int`` if it is a whole number ``>= minimum`` (an int, or a
    float / NumPy number with a whole value), else a ValueError naming ``owner``'s
    argument ``name``: NaN, infinities, fractions, booleans and strings are refused."""
    kind = "a non-negative integer" if minimum == 0 else "a positive integer"
    number = (not isinstance(value, (bool, np.bool_))
              and isinstance(value, (int, float, np.integer, np.floating)))
    if not number or not np.isfinite(value) or int(value) != value or value < minimum:
        raise ValueError(f"{owner} {name} must be {kind}, got {value!r}.")
    return int(value)


def static_size(value):
    """A batch size as a Python int when it is known while tracing, else None."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    static = tf.get_static_value(value)
    return None if static is None else int(static)


# The first and last parts of a too-small-batch message; the batch size goes between
# them. A batch whose size is known only at run time is checked by tf.debugging.Assert,
# which prints its data as "[first] [size] [last]": batch_error() turns that back into
# this sentence (AggregatedModel re-raises it as a ValueError from fit/train_on_batch).
_SHORT_LAST_BATCH = (" If only the last batch of an epoch is this short, pick a batch size that "
                     "divides the number of examples, or drop the remainder "
                     "(tf.data: .batch(batch_size, drop_remainder=True)).")


def batch_check(ok, first, size, last):
    """An op asserting ``ok`` at run time with the message ``first size last``."""
    return tf.debugging.Assert(ok, [first, size, last + _SHORT_LAST_BATCH])


def batch_error(err) -> Optional[str]:
    """The sentence of a failed :func:`batch_check` in ``err``'s message, else None."""
    found = re.search(r"assertion failed: \[((?:Winsorized|MedianOfMeans)\(.*?)\] \[(\d+)\] \[(.*?)\]\s*$",
                      str(err), re.M)
    if found is None:
        return None
    return f"{found.group(1)} {found.group(2)}{found.group(3)}"


def _after(checks, *tensors):
    """``tensors`` made to wait for the ``checks`` ops (none: unchanged), so that a
    failed check is the error reported, not a later op's error on the bad batch."""
    if not checks:
        return tensors
    with tf.control_dependencies(checks):
        return tuple(tf.identity(t) for t in tensors)


class Aggregator:
    """Base class. ``kind`` says what the aggregator consumes:

    * ``"per_example"``: :meth:`reduce` gets one layer variable's per-example
      gradients ``[B, ...]`` (of the batch-mean loss, so their plain sum is the usual
      gradient) and returns the update direction;
    * ``"groups"``: :meth:`combine` gets the group-mean gradients ``[G, ...]``.

    What the train steps and the experiments ask of every aggregator, so that none of
    them branches on its class: :meth:`reduce` (``per_example`` kind) with the global
    batch size, optionally ``reduce_outer(a, dz, global_batch=...)`` for per-example
    gradients that are outer products, :meth:`check_batch`, :meth:`label`, and
    ``plain`` (True when the update is the usual mean gradient, so Keras's own step
    trains it).
    """

    kind = "per_example"
    name = "aggregator"
    plain = False

    def get_config(self):
        return {}

    def reduce(self, per_example, *, global_batch=None):
        """The update direction from one variable's per-example gradients ``[B, ...]``;
        ``global_batch``: the examples over all replicas (None: ``B``)."""
        raise TypeError(_missing_method(type(self)) or
                        f"{type(self).__name__} combines group means (kind 'groups'): it has no reduce.")

    def check_batch(self, batch: int, which: str = "a batch") -> None:
        """Raise ``ValueError`` (what is wrong and how to fix it) if a batch of ``batch``
        examples -- ``which`` names it in the message -- cannot be aggregated."""

    def label(self) -> str:
        """A short name for plots and tables."""
        return type(self).__name__

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def spec(self) -> str:
        """The string form, e.g. ``winsorized:c=4``, accepted by :func:`get`."""
        cfg = self.get_config()
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in cfg.items() if v is not None) if cfg else "")


class Mean(Aggregator):
    """Plain gradient descent: the sum of the per-example gradients of the mean loss."""

    name = "mean"
    plain = True

    def label(self):
        return "SGD"

    def reduce(self, per_example, *, global_batch=None):
        total = tf.reduce_sum(per_example, 0)
        if _in_replica_context():
            total = tf.distribute.get_replica_context().all_reduce("sum", total)
        return total


class Winsorized(Aggregator):
    """Winsorized gradient: per coordinate, clip the ``c`` largest and ``c`` smallest of
    the batch's per-example values to the (c+1)-th largest / smallest, then sum.

    ``c = 0`` is plain gradient descent; ``c`` must be smaller than half the batch.
    A batch of ``B <= 2c`` examples is refused: with a ValueError when ``B`` is known
    while tracing, else by a run-time check, which ``fit`` and ``train_on_batch`` of an
    :class:`~keras_coherence.aggregation.AggregatedModel` re-raise as the same
    ValueError (e.g. for a short last batch).
    ``percentile=p`` instead takes ``c = round(p/100 * (B - 1))`` per batch -- the
    nearest-rank percentiles ``p`` and ``100 - p`` of the ICLR 2020 code.

    The clipped sum is computed as ``sum - sum(top c) + c * top_(c+1) - sum(bottom c)
    + c * bottom_(c+1)`` from the top and bottom ``c + 1`` values, which is exact
    with ties and lets replicas combine their local extremes.

    Speed: on one device, with float32 values, at most 128 examples and ``c + 1 <= 8``
    (``c`` fixed, or a percentile of a batch size known when tracing), the top and
    bottom ``c + 1`` values come from an XLA-compiled selection network over the
    examples (sorted groups of eight merged into running lists; min/max only, so
    exact with ties) instead of ``tf.math.top_k`` on the transposed values -- on CPU
    the winsorized train step of an MLP 784-512-512-10 at batch 128 drops from ~170x
    to ~3x a plain step (``benchmarks/aggregation_overhead.py``). :meth:`reduce_outer`
    takes per-example gradients of the form ``a_i (outer) dz_i`` (a Dense kernel) as
    their two factors and forms each value inside the network, never storing
    ``[B, in, out]``. Other cases (more examples, ``tf.distribute`` replicas, other
    dtypes) take ``top_k``; set ``use_network = False`` (on the class or an instance)
    to always use it. The first step compiles one network per layer shape (seconds).

    Example:
      >>> import numpy as np, keras_coherence as kc
      >>> g = np.array([[1.0], [2.0], [3.0], [100.0], [-50.0]], "float32")
      >>> float(kc.aggregation.Winsorized(c=1).reduce(kc.tf.constant(g))[0])  # 1+1+2+3+3
      10.0
    """

    name = "winsorized"
    use_network = True

    def __init__(self, c: Optional[int] = None, percentile: Optional[float] = None):
        if (c is None) == (percentile is None):
            raise ValueError("Winsorized needs exactly one of c (a count) or percentile.")
        if c is not None:
            c = integer_arg(c, "Winsorized", "c", 0)
        if percentile is not None:
            number = (not isinstance(percentile, (bool, np.bool_))
                      and isinstance(percentile, (int, float, np.integer, np.floating)))
            if not number or not np.isfinite(percentile) or not 0 <= percentile < 50:
                raise ValueError(f"Winsorized percentile must be a number in [0, 50), got {percentile!r}.")
            if np.float32(percentile / 100.0) >= 0.5:  # c is computed in float32
                raise ValueError(f"Winsorized percentile {percentile!r} is 50 in float32; use a "
                                 "percentile below 49.99999.")
        self.c = c
        self.percentile = percentile

    def get_config(self):
        return {"c": self.c} if self.c is not None else {"percentile": self.percentile}

    def _static_count(self, batch):
        """``c`` for a batch of ``batch`` examples (a Python int), as :meth:`count`."""
        if self.c is not None:
            return self.c
        # float32 product, round half to even, as count() computes it at run time
        return int(np.round(np.float32(self.percentile / 100.0) * np.float32(batch - 1)))

    def _too_few(self, c):
        """The start of the message for a batch too small for ``c`` (the batch size follows)."""
        form = f"c={self.c}" if self.c is not None else f"percentile={self.percentile}, i.e. c={c}"
        return f"Winsorized({form}) needs more than {2 * c} examples per batch, got"

    def checked_count(self, batch):
        """``(c, checks)`` for a (global) batch of ``batch`` examples: ``c`` as a tensor
        and the run-time checks (ops) that the batch holds more than ``2 c`` examples.
        A batch size known while tracing is checked at once (a ValueError)."""
        static_batch = static_size(batch)
        if static_batch is not None:
            c = self._static_count(static_batch)
            if 2 * c >= static_batch:
                raise ValueError(f"{self._too_few(c)} {static_batch}: use a smaller c or a larger batch.")
            return tf.constant(c, tf.int32), []
        batch = tf.cast(batch, tf.int32)
        if self.c is not None:
            c = tf.constant(self.c, tf.int32)
            first = self._too_few(self.c)
        else:
            c = tf.cast(tf.math.round(self.percentile / 100.0 * tf.cast(batch - 1, tf.float32)), tf.int32)
            first = f"Winsorized(percentile={self.percentile}) needs a batch with 2c < its size, got"
        return c, [batch_check(2 * c < batch, first, batch, ": use a smaller c or a larger batch.")]

    def count(self, batch):
        """``c`` for a (global) batch of ``batch`` examples, checked against it (see
        :meth:`checked_count`); the returned tensor waits for the run-time check."""
        c, checks = self.checked_count(batch)
        return _after(checks, c)[0]

    def _network_c(self, batch, dtype):
        """``c`` as a Python int when the selection network applies, else None."""
        if not self.use_network or dtype != tf.float32 or _in_replica_context():
            return None
        c = self.c
        if c is None:  # percentile: c follows the batch, so it must be known now
            static_batch = static_size(batch)
            if static_batch is None:
                return None
            c = self._static_count(static_batch)
        return c if c + 1 <= _NETWORK_MAX_K else None

    def label(self):
        text = f"WGD c={self.c}" if self.c is not None else f"WGD p={self.percentile:g}"
        return text + (" (=SGD)" if self.c == 0 else "")

    def check_batch(self, batch, which="a batch"):
        if self.c is not None and 2 * self.c >= batch:
            raise ValueError(
                f"winsorizing c={self.c} per side needs more than {2 * self.c} examples per batch, "
                f"but {which} has {batch}; use a smaller c, a larger batch size, or a training-set "
                "size that the batch size divides.")

    def reduce(self, per_example, *, global_batch=None):
        per_example = tf.convert_to_tensor(per_example)
        batch = global_batch
        if batch is None:
            batch = per_example.shape[0] if per_example.shape[0] is not None else tf.shape(per_example)[0]
        c, checks = self.checked_count(batch)
        per_example, c = _after(checks, per_example, c)
        static_c = self._network_c(batch, per_example.dtype)
        if static_c is not None:
            rows = per_example.shape[0] if per_example.shape[0] is not None else tf.shape(per_example)[0]
            flat = tf.reshape(per_example, [rows, -1])
            if static_c == 0:
                return tf.reduce_sum(per_example, 0)
            out = _network_sum("rows", [flat], static_c, lambda: self._reduce_top_k(per_example, c))
            return tf.reshape(out, tf.shape(per_example)[1:])
        return self._reduce_top_k(per_example, c)

    def reduce_outer(self, a, dz, *, global_batch=None):
        """:meth:`reduce` of the per-example outer products ``a_i (outer) dz_i``
        (``a``: ``[B, n_in]``, ``dz``: ``[B, n_out]``; the result is ``[n_in, n_out]``)
        without forming them when the selection network applies (else they are formed
        and reduced by ``top_k``).

        Example:
          >>> import numpy as np, keras_coherence as kc
          >>> a, dz = np.ones((5, 1), "float32"), np.array([[1.], [2.], [3.], [100.], [-50.]], "float32")
          >>> float(kc.aggregation.Winsorized(c=1).reduce_outer(a, dz)[0, 0])
          10.0
        """
        a, dz = tf.convert_to_tensor(a), tf.convert_to_tensor(dz)
        batch = global_batch
        if batch is None:
            batch = a.shape[0] if a.shape[0] is not None else tf.shape(a)[0]
        c, checks = self.checked_count(batch)
        a, dz, c = _after(checks, a, dz, c)
        static_c = self._network_c(batch, a.dtype)

        def fallback():
            return self._reduce_top_k(tf.einsum("bi,bj->bij", a, dz), c)

        if static_c is None or dz.dtype != a.dtype:
            return fallback()
        if static_c == 0:
            return tf.matmul(a, dz, transpose_a=True)
        return _network_sum("outer", [a, dz], static_c, fallback)

    def _reduce_top_k(self, per_example, c):
        """The clipped sum from ``tf.math.top_k`` (any ``c``, batch and dtype; combines
        replicas' local extremes under ``tf.distribute``)."""
        flat = tf.reshape(per_example, [tf.shape(per_example)[0], -1])
        columns = tf.transpose(flat)  # [N, B]: top_k works on the last axis
        k = c + 1
        replicated = _in_replica_context()
        if replicated:  # every replica must hold at least c + 1 examples to nominate
            tf.debugging.assert_less_equal(k, tf.shape(columns)[1], message=(
                "Winsorized under tf.distribute: each replica needs at least c + 1 examples."))
        top = tf.math.top_k(columns, k, sorted=True).values
        bottom = -tf.math.top_k(-columns, k, sorted=True).values
        total = tf.reduce_sum(flat, 0)
        if replicated:  # the global extremes are among the replicas' local extremes
            ctx = tf.distribute.get_replica_context()
            total = ctx.all_reduce("sum", total)
            top = tf.math.top_k(ctx.all_gather(top, axis=1), k, sorted=True).values
            bottom = -tf.math.top_k(-ctx.all_gather(bottom, axis=1), k, sorted=True).values
        cf = tf.cast(c, flat.dtype)
        clipped = (total - tf.reduce_sum(top[:, :-1], 1) + cf * top[:, -1]
                   - tf.reduce_sum(bottom[:, :-1], 1) + cf * bottom[:, -1])
        return tf.reshape(clipped, tf.shape(per_example)[1:])


# ----------------------------------------------------------------------------- selection network
# The top and bottom k = c + 1 values per coordinate by a network of min/max over the
# examples, unrolled and XLA-compiled into one loop over the coordinates: each group of
# eight examples is sorted (19 compare-exchanges) and merged into the running sorted
# top and bottom lists (k(k+1)/2 max and k(k-1)/2 min each): ~7 vector operations per
# value for k = 3, all in registers, near the CPU's min/max throughput (groups of four
# cost ~8; for c = 4, 15 -> 12). Only the clipped sum leaves the network: an XLA fusion
# with several outputs (e.g. the lists, to merge chunks of a larger batch) recomputes
# the network once per output (7x slower). XLA's CPU backend stops vectorizing the
# loop beyond ~128 examples (256: ~7x slower per value), hence the cap. A batch whose
# size is only known at run time takes the network of its exact size if it is a bucket
# size, else the smallest bucket that holds it (padding rows masked).

_NETWORK_MAX_K = 8
_NETWORK_BUCKETS = (16, 32, 64, 128)
_NETWORKS = {}
_LEAF = 8
# Batcher's odd-even merge sort of 8 (19 compare-exchanges; checked by the 0-1 principle).
_SORT8 = ((0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7), (0, 1), (2, 3), (4, 5),
          (6, 7), (2, 4), (3, 5), (1, 4), (3, 6), (1, 2), (3, 4), (5, 6))


def _compare(x, y):
    return tf.maximum(x, y), tf.minimum(x, y)


def _sort8(v):
    """Eight tensors sorted elementwise, largest first (compare-exchanges whose outputs
    are unused are dropped by XLA)."""
    v = list(v)
    for i, j in _SORT8:
        v[i], v[j] = _compare(v[i], v[j])
    return v


def _merge(t, s, k, better, worse):
    """The first ``k`` of the union of two lists, each ordered best first by ``better``
    (``tf.maximum`` for top lists): the m-th best is the best over p + q = m of the
    worse of ``t[p]`` and ``s[q]`` (with ``t[0] = s[0]`` = best possible)."""
    out = []
    for m in range(1, min(k, len(t) + len(s)) + 1):
        terms = [t[m - 1]] if m <= len(t) else []
        if m <= len(s):
            terms.append(s[m - 1])
        terms += [worse(t[p - 1], s[m - p - 1]) for p in range(max(1, m - len(s)), min(m - 1, len(t)) + 1)]
        best = terms[0]
        for term in terms[1:]:
            best = better(best, term)
        out.append(best)
    return out


def _clip_correction(row, size, n, c, lower=0):
    """``sum_i clip(v_i) - sum_i v_i`` per coordinate over examples ``i < n``: ``row(i)``
    gives example ``i``'s values (``i`` a Python int < ``size``, or a scalar tensor);
    ``n`` is a Python int (``== size``) or a scalar tensor with ``lower < n <= size``
    whose rows ``>= n`` are ignored."""
    k = c + 1
    neg, pos = float("-inf"), float("inf")
    static = isinstance(n, int)
    leaves = n // _LEAF
    always = leaves if static else (lower + 1) // _LEAF  # leaves that are full for every n
    top = bottom = None
    for leaf in range(leaves if static else size // _LEAF):
        ordered = _sort8([row(_LEAF * leaf + e) for e in range(_LEAF)])
        best, worst = ordered[:k], ordered[::-1][:k]
        if leaf >= always:
            valid = leaf < leaves
            best = [tf.where(valid, v, neg) for v in best]
            worst = [tf.where(valid, v, pos) for v in worst]
        top = best if top is None else _merge(top, best, k, tf.maximum, tf.minimum)
        bottom = worst if bottom is None else _merge(bottom, worst, k, tf.minimum, tf.maximum)
    for j in range(_LEAF - 1):  # the last n % _LEAF examples, one at a time
        if static:
            if j >= n % _LEAF:
                break
            best = worst = [row(_LEAF * leaves + j)]
        else:
            valid = j < n % _LEAF
            value = row(tf.minimum(_LEAF * leaves + j, size - 1))
            best, worst = [tf.where(valid, value, neg)], [tf.where(valid, value, pos)]
        top = best if top is None else _merge(top, best, k, tf.maximum, tf.minimum)
        bottom = worst if bottom is None else _merge(bottom, worst, k, tf.minimum, tf.maximum)
    out = c * (top[c] + bottom[c])
    for r in range(c):
        out = out - top[r] - bottom[r]
    return out


def _network_rows(kind, total, rows):
    """``row(i)``: example ``i``'s values (``i`` a Python int or a scalar tensor)."""
    if kind == "outer":
        a, dz = rows[0], rows[1][:, : tf.shape(total)[-1]]  # a constant for XLA
        # Few ops to trace. Rows of dz stay views of the padded rows: dz[:, None, :]
        # would make XLA copy dz to contiguous (unpadded) rows, 1.4-2x slower.
        a_rows, dz_rows = tf.unstack(a[:, :, None]), tf.unstack(dz)

        def row(i):
            if isinstance(i, int):
                return a_rows[i] * tf.expand_dims(dz_rows[i], 0)
            return tf.gather(a, i)[:, None] * tf.gather(dz, i)[None, :]
    else:
        (x,) = rows
        x_rows = tf.unstack(x)

        def row(i):
            return x_rows[i] if isinstance(i, int) else tf.gather(x, i)
    return row


def _network(kind, size, c, static, lower=0):
    """The XLA-compiled winsorized sum ``fn([n,] total, *rows)`` of ``size`` examples
    (exactly ``size`` when ``static``; else ``n`` of them, ``lower < n <= size``, in
    ``size`` rows). ``total`` is their plain sum; ``rows`` are ``[x]`` (``[size, N]``) or,
    for ``kind == "outer"``, ``[a, dz]`` with ``dz`` padded to more columns than
    ``total`` has (see :func:`_pad_columns`). Traced once for all layer shapes (XLA
    compiles it once per shape)."""
    key = (kind, size, c, static, lower)
    if key not in _NETWORKS:
        matrix = tf.TensorSpec([size, None], tf.float32)
        spec = [tf.TensorSpec([None, None] if kind == "outer" else [None], tf.float32)]
        spec += [matrix, matrix] if kind == "outer" else [matrix]

        def fn(n, total, *rows):
            return total + _clip_correction(_network_rows(kind, total, rows), size, n, c, lower)

        if static:
            _NETWORKS[key] = tf.function(functools.partial(fn, size), input_signature=spec,
                                         jit_compile=True, autograph=False)
        else:
            _NETWORKS[key] = tf.function(fn, input_signature=[tf.TensorSpec([], tf.int32)] + spec,
                                         jit_compile=True, autograph=False)
    return _NETWORKS[key]


def _pad_columns(dz):
    """``dz`` with its rows 16k floats apart for an odd k: rows a power of two of cache
    lines apart share a few cache sets, and the network reads all of them for every
    coordinate (2x slower for 512 columns)."""
    columns = dz.shape[-1]
    if columns is None:
        return dz
    padded = -(-columns // 16) * 16
    if (padded // 16) % 2 == 0:
        padded += 16
    return tf.pad(dz, [[0, 0], [0, padded - columns]])


def _network_sum(kind, tensors, c, fallback):
    """The winsorized sum by the selection network; ``fallback()`` for more examples
    than the largest bucket."""
    if kind == "outer":
        total = tf.matmul(tensors[0], tensors[1], transpose_a=True)
    else:
        total = tf.reduce_sum(tensors[0], 0)

    def layout(rows):
        return [rows[0], _pad_columns(rows[1])] if kind == "outer" else rows

    static_batch = tensors[0].shape[0]
    if static_batch is not None:
        if static_batch > _NETWORK_BUCKETS[-1]:
            return fallback()
        rows = layout(tensors)
        return _network(kind, static_batch, c, True)(total, *rows)
    n = tf.shape(tensors[0])[0]

    def exact(size):  # n == size: no padding rows to mask
        rows = layout([tf.ensure_shape(t, [size] + t.shape[1:].as_list()) for t in tensors])
        return _network(kind, size, c, True)(total, *rows)

    def padded(size, lower):
        index = tf.minimum(tf.range(size), n - 1)  # size rows: the last one repeated
        rows = layout([tf.gather(t, index) for t in tensors])
        return _network(kind, size, c, False, lower)(n, total, *rows)

    branches = []
    for lower, size in zip((0,) + _NETWORK_BUCKETS, _NETWORK_BUCKETS):
        branches += [lambda size=size: exact(size), lambda size=size, lower=lower: padded(size, lower)]
    buckets = tf.constant(_NETWORK_BUCKETS)
    bucket = tf.reduce_sum(tf.cast(n > buckets, tf.int32))
    size = tf.gather(buckets, tf.minimum(bucket, len(_NETWORK_BUCKETS) - 1))
    in_bucket = 2 * bucket + tf.cast(n != size, tf.int32)  # exact size first, then padded
    index = tf.where(bucket < len(_NETWORK_BUCKETS), in_bucket, len(branches))
    return tf.switch_case(index, branches + [fallback])


class MedianOfMeans(Aggregator):
    """M3: split the batch into ``groups`` contiguous groups (sizes differ by at most one
    when ``groups`` does not divide the batch), average the gradients within each
    group, and take the coordinate-wise median of the group means (for an even number
    of groups, the mean of the two middle values). Group gradients come from the same
    single backward pass.

    Every group needs at least one example: a batch with fewer examples than
    ``groups`` is refused (an empty group has no mean), with a ValueError when its
    size is known while tracing, else by a run-time check that ``fit`` and
    ``train_on_batch`` of an :class:`~keras_coherence.aggregation.AggregatedModel`
    re-raise as the same ValueError. A short last batch with at least ``groups``
    examples is used, its groups a little smaller."""

    kind = "groups"
    name = "m3"

    def __init__(self, groups: int = 3):
        self.groups = integer_arg(groups, "MedianOfMeans", "groups", 1)

    def get_config(self):
        return {"groups": self.groups}

    def label(self):
        return "M3" if self.groups == 3 else f"M3 ({self.groups} groups)"

    def check_batch(self, batch, which="a batch"):
        if self.groups > batch:
            raise ValueError(f"{self.groups} groups need at least {self.groups} examples per batch, "
                             f"but {which} has {batch}.")

    def batch_checks(self, batch):
        """The run-time checks (ops) that a (global) batch of ``batch`` examples fills
        every group; a batch size known while tracing is checked at once (ValueError)."""
        first = (f"MedianOfMeans(groups={self.groups}) needs at least {self.groups} examples per batch "
                 "(one per group), got")
        last = ": use fewer groups (m3:groups=G with G at most the batch size) or a larger batch."
        static_batch = static_size(batch)
        if static_batch is not None:
            if static_batch < self.groups:
                raise ValueError(f"{first} {static_batch}{last}")
            return []
        batch = tf.cast(batch, tf.int32)
        return [batch_check(batch >= self.groups, first, batch, last)]

    def combine(self, group_means):
        return coordinate_median(group_means)


def coordinate_median(tensors):
    """The coordinate-wise median of same-shaped tensors (for an even count, the mean of
    the two middle values). Three tensors -- M3 and RM3 -- take four min/max ops and no
    stacked copy, which is most of these methods' overhead on a small model."""
    tensors = list(tensors)
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) == 2:
        return 0.5 * (tensors[0] + tensors[1])
    if len(tensors) == 3:
        a, b, c = tensors
        return tf.maximum(tf.minimum(a, b), tf.minimum(tf.maximum(a, b), c))
    ordered = tf.sort(tf.stack(tensors, 0), axis=0)
    mid = len(tensors) // 2
    if len(tensors) % 2:
        return ordered[mid]
    return 0.5 * (ordered[mid - 1] + ordered[mid])


#: Aggregator classes by spec-string name (:func:`register` adds to it, :func:`get` reads it).
AGGREGATORS = Registry("aggregator", normalize=lowercase_name)


def _missing_method(cls):
    """Why ``cls`` cannot aggregate, or None: the method its ``kind`` needs is missing."""
    if cls.kind == "per_example" and cls.reduce is Aggregator.reduce:
        return (f"{cls.__name__} has kind 'per_example' but no reduce(per_example, *, global_batch=None); "
                "implement it, or set kind = 'groups' and implement combine(group_means).")
    if cls.kind == "groups" and not callable(getattr(cls, "combine", None)):
        return f"{cls.__name__} has kind 'groups' but no combine(group_means); implement it."
    if cls.kind not in ("per_example", "groups"):
        return f"{cls.__name__}.kind must be 'per_example' or 'groups', got {cls.kind!r}."
    return None


def register(*names: str, replace: bool = False):
    """Class decorator: make an :class:`Aggregator` subclass reachable by ``names`` in
    spec strings (``get("name:key=value")``, ``with_aggregator``, the command line's
    ``--aggregators``). A name already taken raises ``ValueError`` unless ``replace=True``.

    Example:
      >>> import keras_coherence as kc
      >>> @kc.aggregation.register("sum_of_signs")
      ... class SumOfSigns(kc.aggregation.Aggregator):
      ...     name = "sum_of_signs"
      ...     def reduce(self, per_example, *, global_batch=None):
      ...         return kc.tf.reduce_sum(kc.tf.sign(per_example), 0)
      >>> kc.aggregation.get("sum_of_signs").label()
      'SumOfSigns'
    """
    if not names:
        raise ValueError("register needs at least one name, e.g. @register(\"my_aggregator\").")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            raise TypeError(f"register decorates Aggregator subclasses, not {cls!r}.")
        if _missing_method(cls):
            raise TypeError(_missing_method(cls))
        return AGGREGATORS.add(cls, *names, replace=replace)

    return decorate


register("mean", "sgd")(Mean)
register("winsorized", "wgd")(Winsorized)
register("m3", "median_of_means")(MedianOfMeans)


def get(spec) -> Aggregator:
    """An aggregator from an instance or a string ``name[:key=value,...]``, e.g.
    ``"winsorized:c=4"``, ``"winsorized:percentile=2"``, ``"m3"``, ``"m3:groups=5"``."""
    if isinstance(spec, Aggregator):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"An aggregator must be an Aggregator or a string, got {type(spec).__name__}.")
    name, _, args = spec.partition(":")
    cls = AGGREGATORS.lookup(name)
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"Aggregator argument {item!r} must look like key=value (in {spec!r}).")
        try:
            kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"Aggregator argument {item!r} needs a number (in {spec!r}).") from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"Bad arguments for aggregator {name!r}: {err}") from None
