"""CoherenceModel's logged values, whole-model and per layer, against references.

Without batch norm the reference is one example at a time (tests/reference.py). With
batch norm in training mode each example's quantity is its contribution to the batch
gradient; the reference computes it with explicit per-example parameter copies, all
in plain TF ops written out here.
"""
import numpy as np

from keras_coherence._keras import keras, tf
from keras_coherence.coherence import with_coherence
from reference import coherence_reference, layer_map

RTOL = 1e-4


def _m_coherence(per_example):
    """``||sum_i g_i||^2 / sum_i ||g_i||^2`` of a ``[B, P]`` array."""
    s = per_example.sum(0)
    return float(s @ s) / float((per_example * per_example).sum())


def test_per_layer_logs_match_one_example_at_a_time():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = rng.integers(0, 3, 12)
    keras.utils.set_random_seed(1)
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh", name="d1")(inp)
    h = keras.layers.LayerNormalization(name="ln")(h)
    out = keras.layers.Dense(3, name="d2")(h)
    model = with_coherence(keras.Model(inp, out), per_layer=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.1), loss)
    ref_mc, _, _, ref_layers = coherence_reference(model, loss, x, y, layer_of=layer_map(model))
    logs = model.train_on_batch(x, y, return_dict=True)  # logged before the update
    np.testing.assert_allclose(logs["m_coherence"], ref_mc, rtol=RTOL)
    np.testing.assert_allclose(logs["alpha"], ref_mc / 12, rtol=RTOL)
    assert set(ref_layers) == {"d1", "ln", "d2"}
    for name, value in ref_layers.items():
        np.testing.assert_allclose(logs[f"m_coherence/{name}"], value, rtol=RTOL, err_msg=name)


def test_train_mode_batchnorm_values_are_per_example_contributions():
    """BN runs on batch statistics in a train step: the logged m-coherence (whole and
    per layer) is that of each example's contribution to the batch gradient."""
    batch = 10
    rng = np.random.default_rng(5)
    x = rng.normal(size=(batch, 4)).astype("float32")
    y = rng.integers(0, 3, batch)
    keras.utils.set_random_seed(2)
    inp = keras.Input((4,))
    h = keras.layers.Dense(5, name="d1")(inp)
    h = keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(h)
    h = keras.layers.Activation("relu", name="relu")(h)
    out = keras.layers.Dense(3, name="d2")(h)
    base = keras.Model(inp, out)
    bn = base.get_layer("bn")
    bn.gamma.assign(rng.uniform(0.5, 1.5, 5).astype("float32"))
    bn.beta.assign(rng.normal(size=5).astype("float32"))
    d1, d2 = base.get_layer("d1"), base.get_layer("d2")
    params = {"d1": [d1.kernel, d1.bias], "bn": [bn.gamma, bn.beta], "d2": [d2.kernel, d2.bias]}
    values = {k: [v.numpy() for v in vs] for k, vs in params.items()}

    # reference: every example i gets its own additive copy of every parameter
    copies = {k: [tf.Variable(tf.zeros((batch,) + v.shape)) for v in vs] for k, vs in values.items()}
    per_ex = lambda k, i: tf.constant(values[k][i])[None] + copies[k][i]  # noqa: E731
    with tf.GradientTape() as tape:
        z = tf.einsum("bi,bio->bo", x, per_ex("d1", 0)) + per_ex("d1", 1)
        mean, var = tf.nn.moments(z, [0])
        h = tf.nn.relu((z - mean) / tf.sqrt(var + 1e-3) * per_ex("bn", 0) + per_ex("bn", 1))
        logits = tf.einsum("bi,bio->bo", h, per_ex("d2", 0)) + per_ex("d2", 1)
        total = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    grads = tape.gradient(total, copies)
    flat = {k: np.concatenate([g.numpy().reshape(batch, -1) for g in gs], 1).astype(np.float64)
            for k, gs in grads.items()}

    model = with_coherence(base, per_layer=True)
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["m_coherence"], _m_coherence(np.concatenate(list(flat.values()), 1)),
                               rtol=RTOL)
    for name, per_example in flat.items():
        np.testing.assert_allclose(logs[f"m_coherence/{name}"], _m_coherence(per_example), rtol=RTOL,
                                   err_msg=name)
    # the step used batch statistics: the moving mean moved towards the batch mean of z
    z_batch_mean = (x @ values["d1"][0] + values["d1"][1]).mean(0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.01 * z_batch_mean, rtol=1e-4, atol=1e-7)
