"""RunningMedian (RM3) / RunningAverage (RA3) against a numpy re-implementation."""
import numpy as np
import pytest

import keras_coherence as kc
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


@pytest.mark.parametrize("how", ["checkpoint", "keras_file"])
def test_resume_makes_exactly_the_next_update(tmp_path, how):
    x, y = _data(48)
    straight = _model(4)
    straight.compile(RunningMedian(keras.optimizers.SGD(0.2)), LOSS)
    straight.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 12 steps

    first = _model(4)
    first.compile(RunningMedian(keras.optimizers.SGD(0.2)), LOSS)
    first.fit(x[:20], y[:20], batch_size=4, epochs=1, shuffle=False, verbose=0)  # 5 steps
    if how == "checkpoint":
        tf.train.Checkpoint(model=first, optimizer=first.optimizer).write(str(tmp_path / "ckpt"))
        resumed = _model(99)
        resumed.compile(RunningMedian(keras.optimizers.SGD(0.2)), LOSS)
        resumed.optimizer.build(resumed.trainable_variables)
        tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(
            str(tmp_path / "ckpt")).assert_consumed()
    else:
        first.save(str(tmp_path / "m.keras"))
        resumed = keras.models.load_model(str(tmp_path / "m.keras"))
        assert isinstance(resumed.optimizer, RunningMedian) and resumed.optimizer.window == 3
    assert int(resumed.optimizer.iterations) == 5
    resumed.fit(x[20:], y[20:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
