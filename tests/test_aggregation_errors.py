"""Bad arguments and batches too small for an aggregator: clear errors on every path,
never a silent no-op; the sizes that are accepted train as a numpy reference says."""
import warnings

import numpy as np
import pytest

import keras_coherence as kc  # noqa: F401
from keras_coherence._keras import keras, tf
from keras_coherence.aggregation import MedianOfMeans, Winsorized, get, with_aggregator
from reference import per_example_grads

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SHORT_LAST = r"If only the last batch of an epoch is this short.*drop_remainder=True"


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(inp)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(h), name="net")


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n)


def _compiled(spec, seed=0, optimizer=None):
    model = with_aggregator(_model(seed), spec)
    model.compile(optimizer or keras.optimizers.SGD(0.5), LOSS)
    return model


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("c", [float("nan"), np.float32("nan"), float("inf"), -1, 2.5, True, "3"])
def test_winsorized_c_must_be_a_non_negative_integer(c):
    with pytest.raises(ValueError, match="Winsorized c must be a non-negative integer, got"):
        Winsorized(c=c)


@pytest.mark.parametrize("p", [float("nan"), float("inf"), -1, 50, 75, True, "2"])
def test_winsorized_percentile_must_be_in_0_50(p):
    with pytest.raises(ValueError, match=r"Winsorized percentile must be a number in \[0, 50\), got"):
        Winsorized(percentile=p)


def test_winsorized_percentile_that_is_50_in_float32_is_refused():
    with pytest.raises(ValueError, match="is 50 in float32"):
        Winsorized(percentile=49.9999999999)


@pytest.mark.parametrize("groups", [float("nan"), float("inf"), 0, -2, 2.5, True, "3"])
def test_m3_groups_must_be_a_positive_integer(groups):
    with pytest.raises(ValueError, match="MedianOfMeans groups must be a positive integer, got"):
        MedianOfMeans(groups)


@pytest.mark.parametrize("spec, match", [
    ("winsorized:c=nan", "Winsorized c must be a non-negative integer, got nan"),
    ("winsorized:c=inf", "Winsorized c must be a non-negative integer, got inf"),
    ("winsorized:c=1.5", "Winsorized c must be a non-negative integer, got 1.5"),
    ("winsorized:percentile=nan", r"percentile must be a number in \[0, 50\), got nan"),
    ("m3:groups=nan", "MedianOfMeans groups must be a positive integer, got nan"),
    ("m3:groups=0", "MedianOfMeans groups must be a positive integer, got 0"),
])
def test_bad_numbers_in_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        get(spec)


def test_whole_numbers_of_any_type_are_accepted():
    assert Winsorized(c=2.0).c == 2 and Winsorized(c=np.int64(3)).c == 3
    assert MedianOfMeans(np.float32(5)).groups == 5 and get("m3:groups=4.0").groups == 4


# ----------------------------------------------------------------------------- Winsorized, small batches

@pytest.mark.parametrize("c, n", [(3, 6), (1, 1), (9, 10)])  # network-eligible, network-eligible, top_k
def test_winsorized_small_static_batch_is_a_value_error(c, n):
    message = rf"Winsorized\(c={c}\) needs more than {2 * c} examples per batch, got {n}: use a smaller c"
    with pytest.raises(ValueError, match=message):
        Winsorized(c=c).reduce(tf.zeros((n, 2)))
    with pytest.raises(ValueError, match=message):
        Winsorized(c=c).reduce_outer(tf.zeros((n, 2)), tf.zeros((n, 3)))


@pytest.mark.parametrize("c, n", [(3, 5), (9, 12)])  # selection network / top_k (k = 10 > 12 // 2)
def test_winsorized_small_dynamic_batch_fails_with_the_message_not_a_kernel_error(c, n):
    w = Winsorized(c=c)
    rows = tf.function(w.reduce, input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    outer = tf.function(w.reduce_outer, input_signature=[tf.TensorSpec([None, 2], tf.float32)] * 2)
    message = rf"Winsorized\(c={c}\) needs more than {2 * c} examples per batch, got\] \[{n}\]"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        rows(tf.zeros((n, 2)))
    if c > 7:  # (outer products through the network: traced for every bucket, slow)
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            outer(tf.zeros((n, 2)), tf.zeros((n, 2)))
    ok = np.arange(2 * c + 1, dtype="float32")[:, None] * np.ones((1, 2), "float32")
    np.testing.assert_allclose(rows(tf.constant(ok)).numpy(), [c * (2 * c + 1)] * 2)  # all clipped to c


def test_winsorized_percentile_is_valid_for_any_batch():
    # c = round(0.49 * (n - 1)): 0 for one or two examples (the sum), 1 for three (3 x median)
    w = Winsorized(percentile=49)
    rows = tf.function(w.reduce, input_signature=[tf.TensorSpec([None, 1], tf.float32)])
    for values, expected in (([5.0], 5.0), ([1.0, 7.0], 8.0), ([1.0, 2.0, 40.0], 6.0)):
        g = np.array(values, "float32")[:, None]
        assert float(w.reduce(tf.constant(g))[0]) == expected
        assert float(rows(tf.constant(g))[0]) == expected


@pytest.mark.parametrize("c, batch", [(1, 1), (9, 8)])  # selection network / top_k
def test_winsorized_fit_with_a_batch_too_small(c, batch):
    model = _compiled(f"winsorized:c={c}")
    x, y = _data(8)
    before = model.get_weights()
    with pytest.raises(ValueError, match=rf"Winsorized\(c={c}\) needs more than {2 * c} examples per batch, "
                                         rf"got {batch}: use a smaller c or a larger batch"):
        model.fit(x, y, batch_size=batch, verbose=0)
    with pytest.raises(ValueError, match=rf"Winsorized\(c={c}\) needs more than {2 * c}"):
        model.train_on_batch(x[:batch], y[:batch])
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_winsorized_short_last_batch_is_a_value_error_and_drop_remainder_fixes_it():
    x, y = _data(13)
    model = _compiled("winsorized:c=2")
    with pytest.raises(ValueError, match=r"Winsorized\(c=2\) needs more than 4 examples per batch, got 3: "
                                         r"use a smaller c or a larger batch\. " + SHORT_LAST):
        model.fit(x, y, batch_size=5, shuffle=False, verbose=0)  # batches of 5, 5, 3
    model = _compiled("winsorized:c=2")
    before = model.get_weights()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(5, drop_remainder=True)
    model.fit(data, verbose=0)
    assert int(model.optimizer.iterations) == 2
    assert max(np.abs(a - b).max() for a, b in zip(before, model.get_weights())) > 1e-4


# ----------------------------------------------------------------------------- M3, small batches

def test_m3_batch_of_one_is_refused_not_a_silent_no_op():
    model = _compiled("m3")
    x, y = _data(8)
    before = model.get_weights()
    message = (r"MedianOfMeans\(groups=3\) needs at least 3 examples per batch \(one per group\), got 1: "
               r"use fewer groups \(m3:groups=G with G at most the batch size\) or a larger batch")
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, batch_size=1, verbose=0)
    with pytest.raises(ValueError, match=message.replace("got 1", "got 2")):
        model.train_on_batch(x[:2], y[:2])
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_m3_short_last_batch_with_fewer_examples_than_groups():
    x, y = _data(7)
    model = _compiled("m3:groups=3")
    with pytest.raises(ValueError, match=r"MedianOfMeans\(groups=3\) needs at least 3 examples per batch "
                                         r"\(one per group\), got 2: use fewer groups.*" + SHORT_LAST):
        model.fit(x, y, batch_size=5, shuffle=False, verbose=0)  # batches of 5 and 2


def test_m3_short_last_batch_with_enough_examples_matches_numpy():
    """Batches of 5 and 3 with 3 groups: the last batch's groups have one example each."""
    x, y = _data(8, seed=3)
    model = _compiled("m3:groups=3", seed=3)
    lr, weights = 0.5, [v.numpy().astype(np.float64) for v in model.trainable_variables]
    reference = _model(3)  # the same initial weights, updated by hand below
    for start, stop in ((0, 5), (5, 8)):
        reference.set_weights([w.astype("float32") for w in weights])
        grads = per_example_grads(reference, LOSS, x[start:stop], y[start:stop])
        parts = np.array_split(np.arange(stop - start), 3)
        for i in range(len(weights)):
            g = np.stack([gs[i] for gs in grads])
            weights[i] = weights[i] - lr * np.median(np.stack([g[p].mean(0) for p in parts]), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=5, shuffle=False, verbose=0)
    for v, w in zip(model.trainable_variables, weights):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-4, atol=1e-6, err_msg=v.name)


# ----------------------------------------------------------------------------- one optimizer, two models

@pytest.mark.parametrize("spec", ["m3", "winsorized:c=1"])
def test_one_optimizer_in_two_aggregated_models_is_refused(spec):
    x, y = _data(8)
    sgd = keras.optimizers.SGD(0.1)
    first = _compiled(spec, seed=0, optimizer=sgd)
    first.fit(x, y, batch_size=4, verbose=0)
    second = _compiled(spec, seed=1, optimizer=sgd)
    before = second.get_weights()
    with pytest.raises(ValueError, match=r"The optimizer 'SGD' of model 'net_\w+' was built for other "
                                         r"variables.*create one optimizer per model"):
        second.fit(x, y, batch_size=4, verbose=0)
    for a, b in zip(before, second.get_weights()):
        np.testing.assert_array_equal(a, b)
