"""Gradient coherence: per-example gradient statistics at about the cost of a step.

* :func:`gradient_stats` -- m-coherence, alpha, alpha_perp, per layer, on a fixed sample.
* :class:`CoherenceModel` / :func:`with_coherence` -- a ``train_step`` that reports the
  training mini-batch's m-coherence and alpha as metrics on every step.
* ``registry`` -- per-layer-type rules (ghost norms, per-example gradients).
"""
from keras_coherence.coherence.registry import LayerRule, register, rule_for  # noqa: F401
from keras_coherence.coherence.stats import (  # noqa: F401
    BATCHNORM_MODES, CoherenceStats, LayerStats, gradient_stats,
)
from keras_coherence.coherence.train_step import CoherenceModel, with_coherence  # noqa: F401
