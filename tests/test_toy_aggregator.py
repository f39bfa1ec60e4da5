"""A new aggregator is one class in one file: this toy, defined and registered here in
the test folder, trains through compile/fit, its spec string and the command line,
without any change to the library."""
import json

import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence import cli
from keras_coherence._keras import keras, tf
from keras_coherence.aggregation import Aggregator, register, with_aggregator


@register("toy_median", "coordinate_median")
class ToyMedian(Aggregator):
    """The coordinate-wise median of the per-example gradients (of each example's own
    loss), on the scale of the mean gradient; needs ``min_batch`` examples."""

    name = "toy_median"

    def __init__(self, min_batch: int = 1):
        self.min_batch = int(min_batch)

    def get_config(self):
        return {"min_batch": self.min_batch}

    def label(self):
        return f"median (>= {self.min_batch})"

    def check_batch(self, batch, which="a batch"):
        if batch < self.min_batch:
            raise ValueError(f"the toy median needs {self.min_batch} examples per batch, but {which} has {batch}.")

    def reduce(self, per_example, *, global_batch=None):
        batch = tf.cast(tf.shape(per_example)[0], per_example.dtype)
        # per_example: gradients of the mean loss, i.e. own-loss gradients / batch
        return _median(per_example * batch)


def _median(x):
    n = tf.shape(x)[0]
    s = tf.sort(x, axis=0)
    return 0.5 * (tf.gather(s, (n - 1) // 2) + tf.gather(s, n // 2))


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_spec_string_round_trip_and_names():
    agg = kc.aggregation.get("toy_median:min_batch=4")
    assert isinstance(agg, ToyMedian) and agg.min_batch == 4
    assert agg.spec() == "toy_median:min_batch=4"
    assert isinstance(kc.aggregation.get("coordinate_median"), ToyMedian)
    with pytest.raises(ValueError, match="'toy_median' is taken by ToyMedian"):
        register("toy_median")(type("Other", (ToyMedian,), {}))


def test_an_aggregator_without_its_method_is_refused_at_registration():
    class NoReduce(Aggregator):
        name = "no_reduce"

    class NoCombine(Aggregator):
        kind = "groups"

    with pytest.raises(TypeError, match=r"NoReduce has kind 'per_example' but no reduce"):
        register("no_reduce")(NoReduce)
    with pytest.raises(TypeError, match="NoCombine has kind 'groups' but no combine"):
        register("no_combine")(NoCombine)
    with pytest.raises(TypeError, match="implement it, or set kind = 'groups'"):
        NoReduce().reduce(tf.zeros((2, 3)))
    with pytest.raises(TypeError, match="MedianOfMeans combines group means"):
        kc.aggregation.MedianOfMeans().reduce(tf.zeros((2, 3)))
    assert "no_reduce" not in kc.aggregation.aggregators.AGGREGATORS


def test_toy_trains_through_compile_and_fit_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 4)).astype("float32")
    y = rng.integers(0, 3, 9)
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.layers.Dense(5, activation="tanh", input_shape=(4,)), keras.layers.Dense(3)])
    before = [w.copy() for w in base.get_weights()]
    per_example = []
    for i in range(len(y)):  # each example's own gradient, one at a time
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], base(x[i:i + 1]))
        per_example.append([g.numpy() for g in tape.gradient(loss, base.trainable_variables)])
    expected = [b - 0.1 * np.median(np.stack([g[k] for g in per_example]), axis=0)
                for k, b in enumerate(before)]
    model = with_aggregator(base, "toy_median")
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    model.fit(x, y, batch_size=9, epochs=1, verbose=0)
    for got, want in zip(base.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_toy_through_the_command_line(tmp_path):
    argv = ["aggregate", "--max-train", "100", "--epochs", "1", "--batch-size", "25", "--hidden", "8",
            "--quiet", "--aggregator", "toy_median:min_batch=5", "--out", str(tmp_path / "ok")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["aggregator"]["kind"] == "aggregator"
    assert summary["aggregator"]["spec"] == "toy_median:min_batch=5"
    # its own batch check, before any training: 25-example batches, 30 needed
    argv[-3:] = ["toy_median:min_batch=30", "--out", str(tmp_path / "bad")]
    assert cli.main(argv) == 2
