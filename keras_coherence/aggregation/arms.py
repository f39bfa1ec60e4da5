"""Training "arms" of the aggregation experiments, from one string each.

* :func:`parse_arm` / :class:`Arm` -- ``"sgd"`` (``"mean"``), ``"winsorized:c=4"`` (any
  :func:`keras_coherence.aggregation.get` spec), ``"m3"``, ``"rm3"`` / ``"ra3"``
  (``"rm5"``, ``"ra5"``, ... for other windows).
* :func:`check_arm` -- reject arms that cannot train with a batch size / data size
  *before* training (e.g. a winsorized ``c`` too large for the last, short batch).
* :func:`build_arm_model` -- a compiled model that trains with an arm: plain SGD for
  ``sgd``, :func:`~keras_coherence.aggregation.with_aggregator` for winsorized and M3,
  :class:`~keras_coherence.optimizers.RunningMedian` around SGD for RM3 / RA3.

>>> parse_arm("winsorized:c=4").label, parse_arm("rm3").label, parse_arm("sgd").label
('WGD c=4', 'RM3', 'SGD')
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from keras_coherence._keras import keras

__all__ = ["Arm", "build_arm_model", "check_arm", "parse_arm"]

_RUNNING = re.compile(r"^(rm|ra)(\d+)$")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to train: ``kind`` is ``"sgd"``, ``"aggregator"`` (per-batch robust
    aggregation through ``with_aggregator``) or ``"running"`` (RM/RA optimizer wrapper)."""

    spec: str                      # canonical string, e.g. "winsorized:c=4", "rm3", "sgd"
    label: str                     # for plots and tables, e.g. "WGD c=4", "RM3"
    kind: str
    aggregator: object = None      # an Aggregator for kind == "aggregator"
    window: int = 0                # for kind == "running"
    reduction: str = "median"      # "median" (RM) or "mean" (RA)


def parse_arm(spec) -> Arm:
    """An :class:`Arm` from ``"sgd"``/``"mean"``, an aggregator spec (``"winsorized:c=4"``,
    ``"wgd:c=2"``, ``"m3"``, ``"m3:groups=5"``), or ``"rm3"`` / ``"ra3"`` (``"rmN"``,
    ``"raN"`` for a window of N). Raises ``ValueError`` with a readable message."""
    from keras_coherence.aggregation import Aggregator, get

    if isinstance(spec, Arm):
        return spec
    if isinstance(spec, Aggregator):
        aggregator = spec
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"An arm must be a non-empty string, got {spec!r}.")
        text = spec.strip().lower()
        match = _RUNNING.match(text)
        if match:
            window = int(match.group(2))
            if window < 1:
                raise ValueError(f"{spec!r}: the window must be at least 1 (e.g. rm3).")
            median = match.group(1) == "rm"
            return Arm(text, f"{'RM' if median else 'RA'}{window}", "running", window=window,
                       reduction="median" if median else "mean")
        if text in ("rm", "ra", "running_median", "running_average"):
            raise ValueError(f"{spec!r}: give the window, e.g. rm3 or ra3.")
        try:
            aggregator = get(text)  # ValueError for unknown names and bad arguments
        except ValueError as err:
            if str(err).startswith("Unknown aggregator"):
                raise ValueError(
                    f"Unknown aggregator {spec.strip()!r}; known: sgd (= mean), winsorized:c=C "
                    "(= wgd), winsorized:percentile=P, m3 (= median_of_means, m3:groups=G), "
                    "rm3 / ra3 (rmN / raN for a window of N).") from None
            raise
    if aggregator.plain:  # the mean gradient: Keras's own train step
        return Arm("sgd", aggregator.label(), "sgd")
    return Arm(aggregator.spec(), aggregator.label(), "aggregator", aggregator=aggregator)


def check_arm(arm: Arm, batch_size: int, num_train: Optional[int] = None) -> None:
    """Raise ``ValueError`` if ``arm`` cannot train with ``batch_size`` on ``num_train``
    examples: a winsorized ``c`` with ``2c >= batch`` (for the full batches or the
    last, shorter one that Keras's ``fit`` makes when ``batch_size`` does not divide
    ``num_train``), or more M3 groups than examples in a batch."""
    batches = [(batch_size, "a batch")]
    if num_train is not None:
        if num_train < batch_size:
            batches = [(num_train, f"the only batch ({num_train} training examples)")]
        elif num_train % batch_size:
            batches.append((num_train % batch_size, f"the last batch ({num_train} % {batch_size})"))
    if arm.aggregator is None:
        return
    for b, which in batches:
        try:
            arm.aggregator.check_batch(b, which)
        except ValueError as err:
            raise ValueError(f"{arm.spec}: {err}") from None


def build_arm_model(arm, base_model: keras.Model, lr: float,
                    report_coherence: bool = False, metrics=("accuracy",)) -> keras.Model:
    """A model compiled to train with ``arm`` (an :class:`Arm` or a spec string), sharing
    ``base_model``'s layers and weights; the loss is sparse cross-entropy on logits.

    * ``sgd``: ``base_model`` itself with ``SGD(lr)`` (no momentum);
    * aggregators: ``with_aggregator(base_model, spec)`` with ``SGD(lr)``;
    * ``rmN`` / ``raN``: ``base_model`` with ``RunningMedian(SGD(lr), window=N)``.

    ``report_coherence=True`` logs the training batch's ``m_coherence`` and ``alpha``
    on every step (``with_coherence`` for SGD / RM / RA, ``with_aggregator(...,
    report_coherence=True)`` for aggregators).
    """
    from keras_coherence.aggregation import with_aggregator
    from keras_coherence.coherence import with_coherence
    from keras_coherence.optimizers import RunningMedian

    arm = parse_arm(arm)
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    if arm.kind == "aggregator":
        model = with_aggregator(base_model, arm.aggregator, report_coherence=report_coherence)
    else:
        model = with_coherence(base_model) if report_coherence else base_model
        if arm.kind == "running":
            optimizer = RunningMedian(optimizer, window=arm.window, reduction=arm.reduction,
                                      name="RunningMedian" if arm.reduction == "median" else "RunningAverage")
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=list(metrics))
    return model
