"""The runnable examples in user-facing docstrings run and print what they claim."""
import doctest
import warnings

import pytest

from keras_coherence import callbacks
from keras_coherence.coherence import stats, train_step

MODULES = [stats, train_step, callbacks]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
