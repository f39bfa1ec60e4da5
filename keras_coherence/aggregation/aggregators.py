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

from typing import Optional

from keras_coherence._keras import tf


def _in_replica_context():
    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False


class Aggregator:
    """Base class. ``kind`` says what the aggregator consumes:

    * ``"per_example"``: :meth:`reduce` gets one layer variable's per-example
      gradients ``[B, ...]`` (of the batch-mean loss, so their plain sum is the usual
      gradient) and returns the update direction;
    * ``"groups"``: :meth:`combine` gets the group-mean gradients ``[G, ...]``.
    """

    kind = "per_example"
    name = "aggregator"

    def get_config(self):
        return {}

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

    def reduce(self, per_example):
        total = tf.reduce_sum(per_example, 0)
        if _in_replica_context():
            total = tf.distribute.get_replica_context().all_reduce("sum", total)
        return total


class Winsorized(Aggregator):
    """Winsorized gradient: per coordinate, clip the ``c`` largest and ``c`` smallest of
    the batch's per-example values to the (c+1)-th largest / smallest, then sum.

    ``c = 0`` is plain gradient descent; ``c`` must be smaller than half the batch.
    ``percentile=p`` instead takes ``c = round(p/100 * (B - 1))`` per batch -- the
    nearest-rank percentiles ``p`` and ``100 - p`` of the ICLR 2020 code.

    The clipped sum is computed as ``sum - sum(top c) + c * top_(c+1) - sum(bottom c)
    + c * bottom_(c+1)`` from the top and bottom ``c + 1`` values, which is exact
    with ties and lets replicas combine their local extremes.

    Example:
      >>> import numpy as np, keras_coherence as kc
      >>> g = np.array([[1.0], [2.0], [3.0], [100.0], [-50.0]], "float32")
      >>> float(kc.aggregation.Winsorized(c=1).reduce(kc.tf.constant(g))[0])  # 1+1+2+3+3
      10.0
    """

    name = "winsorized"

    def __init__(self, c: Optional[int] = None, percentile: Optional[float] = None):
        if (c is None) == (percentile is None):
            raise ValueError("Winsorized needs exactly one of c (a count) or percentile.")
        if c is not None and (int(c) != c or c < 0):
            raise ValueError(f"Winsorized c must be a non-negative integer, got {c!r}.")
        if percentile is not None and not 0 <= percentile < 50:
            raise ValueError(f"Winsorized percentile must be in [0, 50), got {percentile!r}.")
        self.c = None if c is None else int(c)
        self.percentile = percentile

    def get_config(self):
        return {"c": self.c} if self.c is not None else {"percentile": self.percentile}

    def count(self, batch):
        """``c`` for a (global) batch of ``batch`` examples, checked against it."""
        if self.c is not None:
            c = tf.constant(self.c, tf.int32)
        else:
            c = tf.cast(tf.math.round(self.percentile / 100.0 * tf.cast(batch - 1, tf.float32)), tf.int32)
        static_batch = tf.get_static_value(batch)
        if static_batch is not None and self.c is not None and 2 * self.c >= static_batch:
            raise ValueError(
                f"Winsorized(c={self.c}) needs more than {2 * self.c} examples per batch, got "
                f"{static_batch}: use a smaller c or a larger batch.")
        tf.debugging.assert_less(2 * c, tf.cast(batch, tf.int32), message=(
            "Winsorized: c must be smaller than half the batch; use a smaller c or a larger batch."))
        return c

    def reduce(self, per_example, global_batch=None):
        batch = tf.shape(per_example)[0] if global_batch is None else global_batch
        c = self.count(batch)
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


class MedianOfMeans(Aggregator):
    """M3: split the batch into ``groups`` contiguous groups (sizes differ by at most one
    when ``groups`` does not divide the batch), average the gradients within each
    group, and take the coordinate-wise median of the group means (for an even number
    of groups, the mean of the two middle values). Group gradients come from the same
    single backward pass."""

    kind = "groups"
    name = "m3"

    def __init__(self, groups: int = 3):
        if int(groups) != groups or groups < 1:
            raise ValueError(f"MedianOfMeans groups must be a positive integer, got {groups!r}.")
        self.groups = int(groups)

    def get_config(self):
        return {"groups": self.groups}

    def combine(self, group_means):
        stacked = tf.stack(group_means, 0)
        if self.groups == 1:
            return stacked[0]
        if self.groups == 3:  # median of three without a sort
            return (tf.reduce_sum(stacked, 0) - tf.reduce_max(stacked, 0) - tf.reduce_min(stacked, 0))
        ordered = tf.sort(stacked, axis=0)
        mid = self.groups // 2
        if self.groups % 2:
            return ordered[mid]
        return 0.5 * (ordered[mid - 1] + ordered[mid])


_BY_NAME = {"mean": Mean, "sgd": Mean, "winsorized": Winsorized, "wgd": Winsorized,
            "m3": MedianOfMeans, "median_of_means": MedianOfMeans}


def get(spec) -> Aggregator:
    """An aggregator from an instance or a string ``name[:key=value,...]``, e.g.
    ``"winsorized:c=4"``, ``"winsorized:percentile=2"``, ``"m3"``, ``"m3:groups=5"``."""
    if isinstance(spec, Aggregator):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"An aggregator must be an Aggregator or a string, got {type(spec).__name__}.")
    name, _, args = spec.partition(":")
    cls = _BY_NAME.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"Unknown aggregator {name!r}; known: {', '.join(sorted(_BY_NAME))}.")
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
