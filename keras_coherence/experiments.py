"""Deprecated: the experiments' helpers moved. The arms are
``keras_coherence.aggregation.arms``, ``SubsetAccuracy`` is in ``keras_coherence.callbacks``,
and the example scripts' helpers, CSV and plots are ``keras_coherence.workflows.experiments``.
This module re-exports them for one release.
"""
import warnings

from keras_coherence.workflows.experiments import *  # noqa: F401,F403
from keras_coherence.workflows.experiments import __all__  # noqa: F401

warnings.warn("keras_coherence.experiments is deprecated; use keras_coherence.aggregation.arms, "
              "keras_coherence.callbacks.SubsetAccuracy and keras_coherence.workflows.experiments",
              DeprecationWarning, stacklevel=2)
