"""RunningMedian (RM3) / RunningAverage (RA3) against a numpy re-implementation."""
import numpy as np
import pytest

import keras_coherence as kc  # noqa: F401  (first: selects Keras 2)
from keras_coherence._keras import keras, tf
from keras_coherence.optimizers import RunningAverage, RunningMedian

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(seed=0, l2=0.0):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.l2(l2) if l2 else None
    return keras.Sequential([
        keras.layers.Dense(5, activation="tanh", input_shape=(4,), kernel_regularizer=reg),
        keras.layers.Dense(3),
    ])


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n)


def _numpy_run(model, x, y, batch, lr, window, reduction):
    """Plain tape gradients on a copy of the model, ring buffer and median in numpy."""
    variables = model.trainable_variables
    ring = None
    for step, start in enumerate(range(0, len(x), batch)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[start:start + batch], model(x[start:start + batch], training=True))
            loss = loss + tf.add_n(model.losses) if model.losses else loss
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
        if ring is None:
            ring = [np.stack([g] * window) for g in grads]
        else:
            for r, g in zip(ring, grads):
                r[step % window] = g
        if step + 1 >= window:
            for v, r in zip(variables, ring):
                direction = np.median(r, 0) if reduction == "median" else r.mean(0)
                v.assign(v.numpy() - lr * direction)


@pytest.mark.parametrize("window, reduction, l2", [(3, "median", 0.0), (3, "mean", 0.01), (5, "median", 0.0)])
def test_matches_numpy_ring_buffer(window, reduction, l2):
    x, y = _data(40)
    ours, ref = _model(1, l2), _model(1, l2)
    opt = RunningMedian(keras.optimizers.SGD(0.3), window=window, reduction=reduction)
    ours.compile(opt, LOSS)
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    _numpy_run(ref, x, y, 4, 0.3, window, reduction)
    for a, b in zip(ours.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(opt.iterations) == 10


def test_no_update_before_the_window_is_full():
    x, y = _data(8)
    model = _model(2)
    before = model.get_weights()
    model.compile(RunningMedian(keras.optimizers.SGD(0.3)), LOSS)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 2 steps < window 3
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_window_one_is_the_inner_optimizer_adam_and_schedule_included():
    x, y = _data(32)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
    plain, wrapped = _model(3), _model(3)
    plain.compile(keras.optimizers.Adam(schedule), LOSS)
    wrapped.compile(RunningMedian(keras.optimizers.Adam(schedule), window=1, allow_momentum=True), LOSS)
    for m in (plain, wrapped):
        m.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), wrapped.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_momentum_is_refused_unless_allowed():
    with pytest.raises(ValueError, match="momentum"):
        RunningMedian(keras.optimizers.SGD(0.1, momentum=0.9))
    with pytest.raises(ValueError, match="beta_1"):
        RunningAverage(keras.optimizers.Adam())
    RunningMedian(keras.optimizers.SGD(0.1, momentum=0.9), allow_momentum=True)
    with pytest.raises(ValueError, match="reduction"):
        RunningMedian(reduction="max")


def _rm3(momentum=0.0):
    return RunningMedian(keras.optimizers.SGD(0.2, momentum=momentum), allow_momentum=momentum > 0)


@pytest.mark.parametrize("how, momentum", [("checkpoint", 0.0), ("keras_file", 0.0), ("h5", 0.0),
                                           ("h5", 0.5), ("keras_file", 0.5)])
def test_resume_makes_exactly_the_next_update(tmp_path, how, momentum):
    """Save after 5 steps, load, train 7 more: the weights equal 12 uninterrupted steps
    (the ring buffer, step count and the inner optimizer's momentum all restored)."""
    x, y = _data(48)
    straight = _model(4)
    straight.compile(_rm3(momentum), LOSS)
    straight.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 12 steps

    first = _model(4)
    first.compile(_rm3(momentum), LOSS)
    first.fit(x[:20], y[:20], batch_size=4, epochs=1, shuffle=False, verbose=0)  # 5 steps
    if how == "checkpoint":
        tf.train.Checkpoint(model=first, optimizer=first.optimizer).write(str(tmp_path / "ckpt"))
        resumed = _model(99)
        resumed.compile(_rm3(momentum), LOSS)
        resumed.optimizer.build(resumed.trainable_variables)
        tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(
            str(tmp_path / "ckpt")).assert_consumed()
    else:
        path = str(tmp_path / ("m.h5" if how == "h5" else "m.keras"))
        first.save(path)
        resumed = keras.models.load_model(path)
        assert isinstance(resumed.optimizer, RunningMedian) and resumed.optimizer.window == 3
    assert int(resumed.optimizer.iterations) == 5
    for saved, loaded in zip(first.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy(), err_msg=saved.name)
    resumed.fit(x[20:], y[20:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_keras_file_of_the_older_layout_still_loads():
    """.keras files written while ``variables`` still held the inner optimizer's step
    counter (right after this optimizer's own variables) load into the same state."""
    x, y = _data(20)
    model = _model(5)
    model.compile(_rm3(0.5), LOSS)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    opt = model.optimizer
    old_layout = list(opt._variables) + list(opt.inner.variables)
    store = {str(i): v.numpy() for i, v in enumerate(old_layout)}
    fresh = _model(6)
    fresh.compile(_rm3(0.5), LOSS)
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.optimizer.load_own_variables(store)
    for a, b in zip(opt.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    assert int(fresh.optimizer.iterations) == 5


def test_set_weights_refuses_values_of_another_optimizer():
    model = _model(0)
    model.compile(_rm3(), LOSS)
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match=r"got 2 values for 9 variables"):
        model.optimizer.set_weights([np.zeros(()), np.zeros(())])  # 9: step, 4 rings, 4 SGD slots
    values = [v.numpy() for v in model.optimizer.variables]
    values[1] = values[1][:1]
    with pytest.raises(ValueError, match="has shape"):
        model.optimizer.set_weights(values)


@pytest.mark.parametrize("window", [float("nan"), float("inf"), 0, -3, 2.5, True, "3"])
def test_window_must_be_a_positive_integer(window):
    with pytest.raises(ValueError, match="RunningMedian window must be a positive integer, got"):
        RunningMedian(keras.optimizers.SGD(0.1), window=window)


def test_window_as_a_whole_float_is_accepted():
    assert RunningMedian(keras.optimizers.SGD(0.1), window=5.0).window == 5


@pytest.mark.parametrize("share", ["wrapper", "inner"])
def test_one_optimizer_in_two_models_is_refused(share):
    x, y = _data(8)
    inner = keras.optimizers.SGD(0.1)
    opt = RunningMedian(inner)
    first, second = _model(0), _model(1)
    first.compile(opt, LOSS)
    first.fit(x, y, batch_size=4, verbose=0)
    before = second.get_weights()
    second.compile(opt if share == "wrapper" else RunningMedian(inner), LOSS)
    which = "This RunningMedian" if share == "wrapper" else "The inner optimizer SGD of this RunningMedian"
    with pytest.raises(ValueError, match=f"{which} was built for other variables.*create one optimizer per model"):
        second.fit(x, y, batch_size=4, verbose=0)
    for a, b in zip(before, second.get_weights()):  # nothing was applied to the second model
        np.testing.assert_array_equal(a, b)
