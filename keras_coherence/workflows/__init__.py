"""The application layer: each job of the command line as a typed config, a ``run``
function and a summary, usable from Python without argv.

* :mod:`~keras_coherence.workflows.coherence` -- SGD while m-coherence is measured;
* :mod:`~keras_coherence.workflows.aggregate` -- a robust aggregator on noisy labels;
* :mod:`~keras_coherence.workflows.quantize` -- float -> PO2 QAT -> integer TFLite;
* :mod:`~keras_coherence.workflows.bnn` -- a binary network, its memory, LCE and on-device exports;
* :mod:`~keras_coherence.workflows.edge` -- the export / LCE / Keras-baseline steps around ``python -m edge``;
* :mod:`~keras_coherence.workflows.demo` -- short runs of all of them;
* :mod:`~keras_coherence.workflows.experiments` -- the example scripts' helpers, CSV and plots.

Each ``Config`` checks its values when built and raises :class:`ConfigError` (a
``ValueError``) naming the option as the command line spells it. The library never
imports this package (``tests/test_architecture.py``).
"""
from keras_coherence.workflows._common import ConfigError, Summary  # noqa: F401
