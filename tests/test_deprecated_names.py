"""Renamed public functions keep their old names for one release: each old name warns
with a DeprecationWarning naming the new one and returns what the new name returns."""
import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence import keras
from keras_coherence._deprecation import REMOVED_IN, deprecated_alias


def _same_model(a, b):
    assert a.to_json() == b.to_json()
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def _same_bytes(a, b):
    assert isinstance(a, bytes) and a == b


def _seeded(*args, **kwargs):
    """A call of a model builder with the same initial weights every time."""
    def call(build):
        keras.utils.set_random_seed(0)
        return build(*args, **kwargs)
    return call


def _float_model():
    return (kc.models.build_model, kc.models.build_float_model, "keras_coherence.models.build_float_model",
            _seeded("mlp", (5,), 3, hidden=(4,)), _same_model)


def _binary_model():
    from keras_coherence.binary import models as bm

    return (bm.build_model, bm.build_binary_model, "keras_coherence.binary.models.build_binary_model",
            _seeded("mlp", "low_memory", input_shape=(4, 4, 1), num_classes=3, hidden=(6,)), _same_model)


@pytest.mark.parametrize("case", [_float_model, _binary_model],
                         ids=lambda case: case.__name__.strip("_"))
def test_an_old_name_warns_and_returns_what_the_new_name_returns(case):
    old, new, new_name, call, assert_same = case()
    with pytest.warns(DeprecationWarning, match=rf"is deprecated and will be removed in keras_coherence "
                                                rf"{REMOVED_IN}; use {new_name} \(same arguments"):
        from_old = call(old)
    assert_same(from_old, call(new))


@pytest.mark.parametrize("module, old, new", [
    ("keras_coherence.quantization.export", "keras_coherence.quantization.to_tflite", "to_integer_tflite"),
    ("keras_coherence.binary.export_training", "keras_coherence.binary.to_tflite", "to_training_tflite"),
])
def test_the_old_export_names_call_the_new_ones_with_the_same_arguments(module, old, new, monkeypatch):
    """The exports' aliases call the new function (replaced here by a recorder: a real
    conversion is what the new name's own tests check) with every argument, and warn."""
    import importlib

    owner = importlib.import_module(module)
    monkeypatch.setattr(owner, new, lambda *args, **kwargs: ("new", args, kwargs))
    package, _, name = old.rpartition(".")
    alias = getattr(importlib.import_module(package), name)
    with pytest.warns(DeprecationWarning, match=rf"use {module}\.{new} \(same arguments"):
        assert alias("model", 3, flag=True) == ("new", ("model", 3), {"flag": True})


def test_the_alias_follows_the_new_name_and_says_what_it_was(monkeypatch):
    from keras_coherence.binary import export_training

    alias = deprecated_alias("keras_coherence.binary.export_training.to_tflite", export_training.to_training_tflite)
    assert alias.__name__ == "to_tflite" and "to_training_tflite" in alias.__doc__
    monkeypatch.setattr(export_training, "to_training_tflite", lambda module: ("patched", module))
    with pytest.warns(DeprecationWarning, match="to_tflite is deprecated"):
        assert alias("m") == ("patched", "m")
