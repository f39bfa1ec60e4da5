"""Robust gradient aggregation: suppress weak gradient directions during training.

* aggregators (:class:`Mean`, :class:`Winsorized`, :class:`MedianOfMeans`) and
  :func:`get` for string specs;
* :func:`with_aggregator` / :class:`AggregatedModel`: train any Functional model with
  one through ``compile``/``fit``;
* the running median of past steps (RM3) is an optimizer wrapper:
  :class:`keras_coherence.optimizers.RunningMedian`.
"""
from keras_coherence.aggregation.aggregators import (  # noqa: F401
    Aggregator, Mean, MedianOfMeans, Winsorized, get, register,
)
from keras_coherence.aggregation.train_step import (  # noqa: F401
    AggregatedModel, aggregated_train_step, with_aggregator,
)
