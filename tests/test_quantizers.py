"""PO2 quantizers (keras_coherence.quantization) against independent numpy references.

The references below are written from the definitions in the module docstrings and in
QKeras (``quantized_bits(alpha="auto_po2")``), not from our TF code.
"""
import doctest
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras, tf
from keras_coherence.quantization import (
    LearnedPo2,
    MSQEPo2,
    MSQEPo2Baseline,
    PO2Quantizer,
    deserialize,
    get,
    serialize,
)
from keras_coherence.quantization import base as q_base
from keras_coherence.quantization import quantizers as q_mod

PROPS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
CLASSES = [MSQEPo2Baseline, MSQEPo2, LearnedPo2]
LN2 = math.log(2.0)


# ----------------------------------------------------------------- references
def qp_of(bits):
    return 2 ** (bits - 1) - 1


def np_axes(rank, per_channel, channel_axis=-1):
    if not per_channel:
        return tuple(range(rank))
    return tuple(i for i in range(rank) if i != channel_axis % rank)


def np_codes(x, e, qp):
    return np.clip(np.rint(np.asarray(x, np.float64) / 2.0 ** e), -qp, qp)


def np_err(x, e, qp, axes, w=None):
    x = np.asarray(x, np.float64)
    d = (x - 2.0 ** e * np_codes(x, e, qp)) ** 2
    if w is not None:
        d = d * w
    return d.sum(axis=axes, keepdims=True)


def np_po2(v):
    return np.round(np.log2(v + 1e-7))


def qkeras_auto_po2(x, bits, axes, iterations=5):
    """QKeras quantized_bits(bits, 0, 1, alpha="auto_po2") scale search, in float32.

    Returns the exponent and the smallest distance of any rounded log2 to a .5 tie.
    """
    x = np.asarray(x, np.float32)
    levels = np.float32(2 * qp_of(bits))
    eps = np.float32(1e-7)
    scale = (np.max(np.abs(x), axis=axes, keepdims=True) * np.float32(2)) / levels
    logs = [np.log(scale + eps) / np.float32(LN2)]
    e = np.round(logs[-1])
    for _ in range(iterations):
        s = np.float32(2.0) ** e
        v = np.floor(np.abs(x) / s + np.float32(0.5))
        z = np.sign(x) * np.where(v < levels / 2, v, levels / 2)
        scale = np.mean(x * z, axis=axes, keepdims=True) / (np.mean(z * z, axis=axes, keepdims=True) + eps)
        logs.append(np.log(scale + eps) / np.float32(LN2))
        e = np.round(logs[-1])
    margin = min(float(np.min(np.abs(np.abs(l - np.floor(l)) - 0.5))) for l in logs)
    return e.astype(np.float64), margin


def np_msqe_weights(x, axes, m2=None, sqrt_weight=True, outlier_sigma=None):
    x = np.asarray(x, np.float64)
    w = None
    if m2 is not None:
        w = (np.sqrt(m2) if sqrt_weight else m2) * np.ones_like(x)
    if outlier_sigma is not None:
        mask = (np.abs(x) <= outlier_sigma * x.std(axis=axes, keepdims=True)).astype(np.float64)
        w = mask if w is None else w * mask
    if w is not None:
        w = np.where(w.sum(axis=axes, keepdims=True) > 0, w, 1.0)
    return w


def np_msqe_po2_window(x, bits, axes, w=None, ls_iterations=3, radius=3):
    """Reference of MSQEPo2's first-call search: LS (keep best) center, then the window."""
    x = np.asarray(x, np.float64)
    qp = qp_of(bits)
    ww = np.ones_like(x) if w is None else w
    e = np_po2(np.max(np.where(ww > 0, np.abs(x), 0.0), axis=axes, keepdims=True) / qp)
    best, best_err = e, np_err(x, e, qp, axes, w)
    for _ in range(ls_iterations):
        q = np_codes(x, e, qp)
        num, den = (ww * x * q).sum(axis=axes, keepdims=True), (ww * q * q).sum(axis=axes, keepdims=True)
        e = np_po2(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))
        err = np_err(x, e, qp, axes, w)
        best, best_err = np.where(err < best_err, e, best), np.minimum(err, best_err)
    window = np.stack([np_err(x, best + d, qp, axes, w) for d in range(-radius, radius + 1)])
    return best, window.min(axis=0)


def is_power_of_two(a):
    mantissa, _ = np.frexp(np.asarray(a, np.float64))
    return np.all(mantissa == 0.5)


# --------------------------------------------------------------------- data
@st.composite
def tensors(draw, min_rank=1, max_rank=4):
    rank = draw(st.integers(min_rank, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 0.05, 1.0, 40.0]))
    kind = draw(st.sampled_from(["normal", "uniform", "laplace", "outliers", "sparse"]))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.normal(size=shape)
    elif kind == "uniform":
        x = rng.uniform(-1, 1, size=shape)
    elif kind == "laplace":
        x = rng.laplace(size=shape)
    elif kind == "outliers":
        x = rng.normal(size=shape)
        x.flat[rng.integers(0, x.size)] = 25.0 * rng.choice([-1, 1])
    else:
        x = rng.normal(size=shape) * (rng.uniform(size=shape) < 0.3)
    return (magnitude * x).astype(np.float32)


bits_st = st.integers(2, 8)


def make(cls, bits=4, per_channel=False, **kwargs):
    return cls(bits=bits, per_channel=per_channel, **kwargs)


def variables_snapshot(q):
    return {k: v.numpy().copy() for k, v in q.state.items()}


# ---------------------------------------------------------------- the grid
@PROPS
@given(x=tensors(), bits=bits_st, per_channel=st.booleans(), cls=st.sampled_from(CLASSES))
def test_outputs_lie_on_the_po2_grid(x, bits, per_channel, cls):
    q = make(cls, bits, per_channel)
    y = q(x, training=True).numpy()
    s = q.scale().numpy()
    qp = qp_of(bits)
    assert is_power_of_two(s)
    assert s.shape == tuple(x.shape[i] if per_channel and i == x.ndim - 1 else 1 for i in range(x.ndim))
    k = y / s
    np.testing.assert_array_equal(k, np.round(k))
    assert np.all(np.abs(k) <= qp)
    codes = q.integer_codes(x).numpy()
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, np_codes(x, np.log2(s), qp))
    np.testing.assert_array_equal(y, codes * s)
    assert q.exponent().dtype == tf.int32
    np.testing.assert_array_equal(2.0 ** q.exponent().numpy(), s)


@PROPS
@given(x=tensors(), bits=bits_st, per_channel=st.booleans(), cls=st.sampled_from(CLASSES))
def test_idempotent_when_frozen(x, bits, per_channel, cls):
    q = make(cls, bits, per_channel)
    q(x, training=True)
    q.freeze()
    y = q(x, training=False)
    np.testing.assert_array_equal(q(y, training=False).numpy(), y.numpy())
    np.testing.assert_array_equal(q(y, training=True).numpy(), y.numpy())
    np.testing.assert_array_equal(y.numpy(), q.scale().numpy() * q.integer_codes(x).numpy())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape, axis, exp_shape", [
    ((5, 3), -1, (1, 3)),
    ((3, 3, 4, 6), -1, (1, 1, 1, 6)),
    ((3, 3, 4, 6), 2, (1, 1, 4, 1)),
    ((7,), -1, (7,)),
])
def test_per_channel_shapes(cls, shape, axis, exp_shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    q = cls(bits=4, per_channel=True, channel_axis=axis)
    q(x, training=True)
    assert tuple(q.exponent().shape) == exp_shape
    assert tuple(cls(bits=4)(x, training=True).shape) == shape
    per_tensor = cls(bits=4)
    per_tensor(x, training=True)
    assert tuple(per_tensor.exponent().shape) == (1,) * len(shape)


@pytest.mark.parametrize("cls", [MSQEPo2Baseline, MSQEPo2, LearnedPo2])
def test_per_channel_equals_per_tensor_on_each_channel(cls):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(20, 4)) * np.array([0.01, 0.3, 2.0, 50.0])).astype(np.float32)
    q = cls(bits=4, per_channel=True)
    y = q(x, training=True).numpy()
    for c in range(4):
        qc = cls(bits=4)
        yc = qc(x[:, c:c + 1], training=True).numpy()
        assert int(qc.exponent().numpy().ravel()[0]) == int(q.exponent().numpy()[0, c])
        np.testing.assert_array_equal(yc[:, 0], y[:, c])


def test_per_channel_needs_a_known_channel_size():
    q = MSQEPo2(per_channel=True)
    with pytest.raises(ValueError, match="channel"):
        q.build(tf.TensorShape([3, None]))
    with pytest.raises(ValueError, match="channel_axis"):
        MSQEPo2(per_channel=True, channel_axis=3).build(tf.TensorShape([3, 4]))


# ---------------------------------------------------------- numbers vs numpy
@PROPS
@given(x=tensors(), bits=bits_st, per_channel=st.booleans())
def test_baseline_matches_qkeras_auto_po2(x, bits, per_channel):
    axes = np_axes(x.ndim, per_channel)
    ref, margin = qkeras_auto_po2(x, bits, axes)
    assume(margin > 1e-4)  # no log2 within float32 error of a rounding tie
    q = MSQEPo2Baseline(bits=bits, per_channel=per_channel)
    y = q(x, training=True).numpy()
    np.testing.assert_array_equal(q.exponent().numpy(), ref)
    np.testing.assert_array_equal(y, 2.0 ** ref * np_codes(x, ref, qp_of(bits)))


@PROPS
@given(x=tensors(), bits=bits_st, per_channel=st.booleans())
def test_msqe_line_search_is_the_window_optimum_and_beats_the_baseline(x, bits, per_channel):
    axes = np_axes(x.ndim, per_channel)
    qp = qp_of(bits)
    q = MSQEPo2(bits=bits, per_channel=per_channel, outlier_mask=False, use_second_moments=False)
    q(x, training=True)
    e = q.exponent().numpy().astype(np.float64)
    err = np_err(x, e, qp, axes)
    _, window_min = np_msqe_po2_window(x, bits, axes)
    tol = 1e-6 * np.sum(np.asarray(x, np.float64) ** 2, axis=axes, keepdims=True) + 1e-30
    np.testing.assert_allclose(err, window_min, rtol=1e-6, atol=0)
    base = MSQEPo2Baseline(bits=bits, per_channel=per_channel)
    base(x, training=True)
    assert np.all(err <= np_err(x, base.exponent().numpy().astype(np.float64), qp, axes) + tol)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_msqe_line_search_finds_the_global_optimum_on_gaussian_weights(bits):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=(3, 3, 8, 16)) * 0.05).astype(np.float32)
    axes = (0, 1, 2)
    q = MSQEPo2(bits=bits, per_channel=True, outlier_mask=False, use_second_moments=False)
    q(x, training=True)
    err = np_err(x, q.exponent().numpy().astype(np.float64), qp_of(bits), axes)
    brute = np.stack([np_err(x, e, qp_of(bits), axes) for e in range(-40, 10)]).min(axis=0)
    np.testing.assert_allclose(err, brute, rtol=1e-6)


@PROPS
@given(x=tensors(min_rank=2), bits=bits_st, per_channel=st.booleans(), sqrt_weight=st.booleans(),
       seed=st.integers(0, 1000))
def test_weighted_msqe_matches_the_numpy_reference(x, bits, per_channel, sqrt_weight, seed):
    axes = np_axes(x.ndim, per_channel)
    m2 = np.random.default_rng(seed).exponential(size=x.shape).astype(np.float32)
    q = MSQEPo2(bits=bits, per_channel=per_channel, sqrt_weight=sqrt_weight)
    q.build(tf.TensorShape(x.shape))
    q.state["m2"].assign(m2)
    std = np.asarray(x, np.float64).std(axis=axes, keepdims=True)
    near = np.abs(np.abs(x) - 2.0 * std) <= 1e-5 * (std + 1e-30)
    assume(not near.any())  # no element at the outlier threshold within float error
    q(x, training=True)
    group = int(np.prod([x.shape[a] for a in axes]))  # no mask below outlier_min_size=16
    w = np_msqe_weights(x, axes, m2.astype(np.float64), sqrt_weight, outlier_sigma=2.0 if group >= 16 else None)
    err = np_err(x, q.exponent().numpy().astype(np.float64), qp_of(bits), axes, w)
    _, window_min = np_msqe_po2_window(x, bits, axes, w)
    np.testing.assert_allclose(err, window_min, rtol=1e-5, atol=1e-12 * float(np.sum(w * x.astype(np.float64) ** 2)))


def test_outlier_mask_skips_small_groups_like_depthwise_channels():
    # A 3x3 depthwise kernel per channel: 9 weights share an exponent, one tap dominates.
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 3, 1, 8)) * 0.05).astype(np.float32)
    x[1, 1, 0, :] = 0.8
    axes = (0, 1, 2)
    default = MSQEPo2(bits=4, per_channel=True, use_second_moments=False)
    default(x, training=True)
    masked = MSQEPo2(bits=4, per_channel=True, use_second_moments=False, outlier_min_size=0)
    masked(x, training=True)
    w = np_msqe_weights(x, axes, None, outlier_sigma=2.0)
    assert (w[1, 1, 0, :] == 0).all()  # the reference mask drops the dominant tap
    for q, weight in ((default, None), (masked, w)):
        err = np_err(x, q.exponent().numpy().astype(np.float64), 7, axes, weight)
        np.testing.assert_allclose(err, np_msqe_po2_window(x, 4, axes, weight)[1], rtol=1e-6)
    # Unmasked, the dominant tap is not clipped; masked, it is.
    clip = lambda e: np.abs(x[1, 1, 0, :]) / 2.0 ** np.ravel(e) > 7.5  # noqa: E731
    assert not clip(default.exponent().numpy()).any() and clip(masked.exponent().numpy()).all()


def test_outlier_mask_ignores_outliers_and_beats_the_baseline_on_inliers():
    rng = np.random.default_rng(3)
    inliers = (rng.normal(size=200) * 0.1).astype(np.float32)
    x = np.concatenate([inliers, [100.0]]).astype(np.float32)
    masked = MSQEPo2(bits=4, use_second_moments=False)
    masked(x, training=True)
    plain = MSQEPo2(bits=4, use_second_moments=False, outlier_mask=False)
    plain(inliers, training=True)
    assert int(masked.exponent().numpy()[0]) == int(plain.exponent().numpy()[0])
    base = MSQEPo2Baseline(bits=4)
    base(x, training=True)
    inlier_err = lambda q: float(np_err(inliers, q.exponent().numpy()[0], 7, (0,)).ravel()[0])  # noqa: E731
    assert inlier_err(masked) < 0.1 * inlier_err(base)


# --------------------------------------------------------------- gradients
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_straight_through_gradient_is_zero_for_clipped_elements(cls, bits):
    rng = np.random.default_rng(bits)
    x = tf.Variable((rng.standard_t(2, size=(40, 3)) * 0.2).astype(np.float32))
    g = rng.normal(size=(40, 3)).astype(np.float32)
    q = cls(bits=bits, per_channel=True)
    q(x, training=True)
    with tf.GradientTape() as tape:
        y = q(x, training=True)
        loss = tf.reduce_sum(y * g)
    gx = tape.gradient(loss, x).numpy()
    e = q.exponent().numpy().astype(np.float64)
    inside = np.abs(np.rint(x.numpy() / 2.0 ** e)) <= qp_of(bits)
    assert (~inside).any() or cls is LearnedPo2
    np.testing.assert_array_equal(gx, np.where(inside, g, 0.0))


@pytest.mark.parametrize("lsq", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_learned_exponent_gradient_matches_the_ste_formula(lsq, per_channel):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(16, 3)) * 0.3).astype(np.float32)
    g = rng.normal(size=(16, 3)).astype(np.float32)
    q = LearnedPo2(bits=3, per_channel=per_channel, rounding="round", lsq_grad_scale=lsq)
    q(x, training=True)
    e_real = np.full(q.log2_scale.shape, -3.3, np.float32)
    if per_channel:
        e_real = np.array([[-3.3, -2.6, -1.2]], np.float32)
    q.log2_scale.assign(e_real)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(x, training=True) * g)
    ge = tape.gradient(loss, q.log2_scale).numpy()
    axes = np_axes(2, per_channel)
    qp = qp_of(3)
    e_int = np.round(e_real.astype(np.float64))
    s = 2.0 ** e_int
    r = np.rint(x / s)
    dyde = LN2 * s * np.where(np.abs(r) <= qp, r - x / s, np.clip(r, -qp, qp))
    expected = (g * dyde).sum(axis=axes, keepdims=True)
    if lsq:
        n = x.size / e_real.size
        expected = expected / np.sqrt(n * qp)
    np.testing.assert_allclose(ge, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(q.exponent().numpy(), e_int)


def test_learned_exponent_grows_when_values_clip():
    x = tf.constant(np.random.default_rng(0).normal(size=(64,)).astype(np.float32))
    q = LearnedPo2(bits=4, rounding="ceil")
    q(x, training=True)
    q.log2_scale.assign([-5.5])  # s = 2**-5: almost every value clips at 7/32

    def loss_at():
        return tf.reduce_mean((q(x, training=True) - x) ** 2)

    with tf.GradientTape() as tape:
        loss = loss_at()
    assert float(tape.gradient(loss, q.log2_scale)[0]) < 0.0
    q.log2_scale.assign([-4.5])
    assert float(loss_at()) < float(loss)


def test_frozen_learned_quantizer_passes_no_gradient_to_the_exponent():
    x = tf.constant(np.random.default_rng(0).normal(size=(32,)).astype(np.float32))
    q = LearnedPo2(bits=4)
    q(x, training=True)
    q.freeze()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(x, training=True) ** 2)
    grad = tape.gradient(loss, q.log2_scale)
    assert grad is None or float(tf.reduce_max(tf.abs(grad))) == 0.0


# ------------------------------------------------------------ state updates
@pytest.mark.parametrize("cls", [MSQEPo2, LearnedPo2])
def test_second_moment_ema_of_unclipped_upstream_gradients(cls):
    rng = np.random.default_rng(5)
    x = tf.constant((rng.standard_t(2, size=(30, 2)) * 0.2).astype(np.float32))
    g = rng.normal(size=(30, 2)).astype(np.float32)
    q = cls(bits=3, per_channel=True, second_moment_decay=0.9)
    q(x, training=True)
    before = q.state["m2"].numpy().copy()
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(q(x, training=True) * g)
    tape.gradient(loss, x)
    e = q.exponent().numpy().astype(np.float64)
    keep = np.abs(np.rint(x.numpy() / 2.0 ** e)) <= qp_of(3)
    assert (~keep).any()
    expected = 0.9 * before + 0.1 * np.where(keep, g.astype(np.float64) ** 2, 0.0)
    np.testing.assert_allclose(q.state["m2"].numpy(), expected, rtol=1e-6)
    # inference: forward and backward leave m2 alone
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(q(x, training=False) * g)
    tape.gradient(loss, x)
    np.testing.assert_allclose(q.state["m2"].numpy(), expected, rtol=1e-6)


def test_second_moments_average_over_an_unknown_batch_dimension():
    q = MSQEPo2(bits=4, second_moment_decay=0.5)
    q.build(tf.TensorShape([None, 3]))
    assert q.state["m2"].shape == (1, 3)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(q(x, training=True) * 2.0)
        return tape.gradient(loss, x)

    x = np.array([[0.1, 0.2, -0.3], [0.05, -0.4, 0.2]], np.float32)
    step(x)
    np.testing.assert_allclose(q.state["m2"].numpy(), 0.5 + 0.5 * 4.0 * np.ones((1, 3)), rtol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_inference_never_writes_state(cls):
    rng = np.random.default_rng(2)
    q = cls(bits=4)
    q(rng.normal(size=(8, 4)).astype(np.float32), training=True)
    before = variables_snapshot(q)
    x2 = tf.Variable(rng.normal(size=(8, 4)).astype(np.float32) * 10)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(x2, training=False) ** 2)
    tape.gradient(loss, x2)
    after = variables_snapshot(q)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_msqe_inference_uses_the_stored_exponent():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50,)).astype(np.float32)
    q = MSQEPo2(bits=4)
    q(x, training=True)
    e = q.exponent().numpy()
    y = q(x * 64.0, training=False).numpy()  # would need a larger exponent
    np.testing.assert_array_equal(y, 2.0 ** e * np_codes(x * 64.0, e, 7))
    fresh = MSQEPo2(bits=4)  # never trained: searches without storing
    y2 = fresh(x, training=False).numpy()
    assert float(fresh.state["initialized"].numpy()) == 0.0
    np.testing.assert_array_equal(y2, 2.0 ** e * np_codes(x, e, 7))


def test_stable_exponent_ema_switch_and_update_flag():
    x = np.random.default_rng(6).normal(size=(64,)).astype(np.float32)
    q = MSQEPo2(bits=4, use_second_moments=False, outlier_mask=False, stable_exponent=True)
    q(x, training=True)
    e1 = float(q.exponent().numpy()[0])
    assert float(q.state["stable_exponent"].numpy()[0]) == e1
    q(x * 8.0, training=True)  # the search moves up by exactly 3
    assert float(q.exponent().numpy()[0]) == e1 + 3
    np.testing.assert_allclose(q.state["stable_exponent"].numpy(), [0.99 * e1 + 0.01 * (e1 + 3)], rtol=1e-6)
    q.switch_to_stable_exponent()
    assert float(q.exponent().numpy()[0]) == e1
    stable = q.state["stable_exponent"].numpy().copy()
    y = q(x * 8.0, training=True).numpy()
    assert float(q.exponent().numpy()[0]) == e1
    np.testing.assert_array_equal(q.state["stable_exponent"].numpy(), stable)
    np.testing.assert_array_equal(y, 2.0 ** e1 * np_codes(x * 8.0, e1, 7))
    q2 = MSQEPo2(bits=4, use_second_moments=False, stable_exponent=True)
    q2(x, training=True)
    q2.state["update_stable"].assign(0.0)
    q2(x * 8.0, training=True)
    assert float(q2.state["stable_exponent"].numpy()[0]) == e1


def test_freeze_and_unfreeze():
    x = np.random.default_rng(8).normal(size=(10, 4)).astype(np.float32)
    q = MSQEPo2(bits=4)
    with pytest.raises(ValueError, match="not built"):
        q.freeze()
    q.build(tf.TensorShape(x.shape))
    with pytest.raises(ValueError, match="nothing to freeze"):
        q.freeze()
    q2 = MSQEPo2(bits=4)
    q2.freeze(x)  # builds and calibrates
    assert q2.frozen and q2.built
    q3 = MSQEPo2(bits=4)
    q3(x, training=True)
    np.testing.assert_array_equal(q2.exponent().numpy(), q3.exponent().numpy())
    e = q2.exponent().numpy()
    q2(x * 100.0, training=True)
    np.testing.assert_array_equal(q2.exponent().numpy(), e)
    q2.unfreeze()
    assert not q2.frozen
    q2(x * 100.0, training=True)
    assert int(q2.exponent().numpy().ravel()[0]) > int(e.ravel()[0])


def test_learned_initialisation_is_three_sigma():
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(30, 3)) * np.array([0.01, 1.0, 0.0])).astype(np.float32)
    x[:, 2] = 0.0
    q = LearnedPo2(bits=4, per_channel=True)
    q(x, training=True)
    expected = np.log2(np.maximum(3.0 * x.std(axis=0, keepdims=True) / 7.0, 1e-5))
    np.testing.assert_allclose(q.log2_scale.numpy(), expected, rtol=1e-5)
    q(x * 5.0, training=True)  # initialized once only
    np.testing.assert_allclose(q.log2_scale.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("rounding", ["ceil", "round", "msqe"])
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_learned_rounding_rules(rounding, frac):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(200,)).astype(np.float32)
    q = LearnedPo2(bits=4, rounding=rounding)
    q(x, training=True)
    e_real = -2.0 + frac
    q.log2_scale.assign([e_real])
    q(x, training=True)
    lo, hi = math.floor(e_real), math.ceil(e_real)
    if rounding == "ceil":
        expected = hi
    elif rounding == "round":
        expected = float(np.round(e_real))
    else:
        m2 = q.state["m2"].numpy()  # updated by no backward pass yet: ones
        w = np.sqrt(m2) * (np.abs(x) <= 2.0 ** e_real * 7.5)
        expected = lo if np_err(x, lo, 7, (0,), w) < np_err(x, hi, 7, (0,), w) else hi
    assert float(q.exponent().numpy()[0]) == expected


# --------------------------------------------------------------- edge cases
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_all_zero_tensor(cls, per_channel):
    x = tf.Variable(tf.zeros((3, 4)))
    q = cls(bits=4, per_channel=per_channel)
    with tf.GradientTape() as tape:
        y = q(x, training=True)
        loss = tf.reduce_sum(y)
    grads = tape.gradient(loss, [x] + q.trainable_weights)
    assert np.all(y.numpy() == 0.0)
    assert np.all(q.integer_codes(x).numpy() == 0)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    floor = -16 if cls is LearnedPo2 else -23  # ceil(log2(1e-5)) / round(log2(1e-7))
    assert np.all(q.exponent().numpy() == floor)
    if cls is LearnedPo2:
        np.testing.assert_allclose(q.log2_scale.numpy(), math.log2(1e-5), rtol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("c", [-3.7, 0.3, 1.0, 1e-3, 250.0])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_tensor(cls, c, bits):
    x = np.full((6, 5), c, np.float32)
    q = cls(bits=bits)
    y = q(x, training=True).numpy()
    assert np.all(np.isfinite(y)) and np.all(y == y.flat[0])
    # QKeras's search can stop on a PO2 scale rounded down from max/qp, which clips the
    # constant by up to a factor sqrt(2); the other two pick the best of floor/ceil.
    bound = abs(c) * (1 - 2 ** -0.5) if cls is MSQEPo2Baseline else abs(c) / qp_of(bits)
    assert abs(float(y.flat[0]) - c) <= bound + 1e-12


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_input_raises(cls, bad):
    q = cls(bits=4)
    x = np.ones((4,), np.float32)
    q(x, training=True)
    before = variables_snapshot(q)
    x[2] = bad
    for training in (True, False):
        with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
            q(x, training=training)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        tf.function(lambda t: q(t, training=True))(tf.constant(x))
    for k, v in variables_snapshot(q).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True, "4", None])
def test_bits_outside_2_to_8_raise(cls, bits):
    with pytest.raises(ValueError, match="bits"):
        cls(bits=bits)


def test_learned_and_msqe_argument_checks():
    with pytest.raises(ValueError, match="rounding"):
        LearnedPo2(rounding="floor")
    with pytest.raises(ValueError, match="min_init_scale"):
        LearnedPo2(min_init_scale=0.0)
    with pytest.raises(ValueError, match="line_search_radius"):
        MSQEPo2(line_search_radius=-1)


# ------------------------------------------------------- registry / config
@pytest.mark.parametrize("alias, cls", sorted(q_mod.ALIASES.items()))
def test_registry_and_config_round_trip(alias, cls):
    assert isinstance(get(alias), cls)
    assert isinstance(get(cls.__name__), cls)
    assert get(None) is None
    q = cls(bits=3, per_channel=True, name="q")
    assert get(q) is q
    for config in (serialize(q), {"class_name": alias, "config": q.get_config()}):
        q2 = get(config)
        assert type(q2) is cls and q2.get_config() == q.get_config()
    assert type(deserialize(alias)) is cls
    assert cls.from_config(q.get_config()).get_config() == q.get_config()
    assert isinstance(q, PO2Quantizer) and isinstance(q, keras.layers.Layer)
    with pytest.raises(ValueError, match="Unknown quantizer"):
        get("po2")
    with pytest.raises(ValueError):
        get(3.0)


def test_docstring_examples():
    from keras_coherence.quantization import tfmot_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in (q_mod, q_base, tfmot_adapter):
            result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            assert result.failed == 0, module.__name__
    assert result.attempted > 0


# ------------------------------------------------------ models and saving
@keras.utils.register_keras_serializable(package="test_quantizers")
class QDense(keras.layers.Dense):
    """Dense whose kernel goes through a PO2 quantizer (test helper)."""

    def __init__(self, units, kernel_quantizer="msqe_po2", **kwargs):
        super().__init__(units, **kwargs)
        self.kernel_quantizer = get(kernel_quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        self.kernel_quantizer.build(self.kernel.shape)

    def call(self, inputs, training=None):
        kernel = self.kernel_quantizer(self.kernel, training=training)
        return tf.matmul(inputs, kernel) + self.bias

    def get_config(self):
        return {**super().get_config(), "kernel_quantizer": serialize(self.kernel_quantizer)}


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        QDense(8, kernel_quantizer=MSQEPo2(bits=4, per_channel=True, stable_exponent=True)),
        keras.layers.Activation("tanh"),
        QDense(3, kernel_quantizer=LearnedPo2(bits=3, lsq_grad_scale=True)),
        QDense(2, kernel_quantizer=MSQEPo2Baseline(bits=5)),
    ])


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, :2] * np.array([1.5, -0.5])).astype(np.float32)


def _quantizer_state(model):
    return {
        f"{i}/{k}": v.numpy().copy()
        for i, layer in enumerate(model.layers) if isinstance(layer, QDense)
        for k, v in layer.kernel_quantizer.state.items()
    }


@pytest.fixture(scope="module")
def trained_model():
    model = _model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x, y = _data()
    learned = model.layers[2].kernel_quantizer
    learned(model.layers[2].kernel, training=True)  # initialize e before measuring it
    e0 = learned.log2_scale.numpy().copy()
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    return model, e0


def test_learned_quantizer_trains_inside_a_keras_model(trained_model):
    model, e0 = trained_model
    learned = model.layers[2].kernel_quantizer
    assert learned.log2_scale.trainable and any(v is learned.log2_scale for v in model.trainable_weights)
    assert not np.array_equal(learned.log2_scale.numpy(), e0)
    state = _quantizer_state(model)
    assert all(np.all(np.isfinite(v)) for v in state.values())
    for layer in (model.layers[0], model.layers[2], model.layers[3]):
        kq = layer.kernel_quantizer
        assert float(kq.state["initialized"].numpy()) == 1.0
        np.testing.assert_array_equal(kq.exponent().numpy(), np.round(kq.state["exponent"].numpy()))


@pytest.mark.parametrize("cls", [MSQEPo2, LearnedPo2])
def test_second_moments_inside_fit_equal_the_analytic_gradient(cls):
    """One ``fit`` step (its tf.function) of ``y = x @ Q(W) + b`` with the loss
    ``sum_n mean_u (y - t)**2`` (4 units): the upstream gradient of ``Q(W)`` is
    ``2 / 4 x^T (x Q(W) + b - t)``; with learning
    rate 0 nothing else moves, so ``m2`` must be ``decay + (1 - decay) * keep * g**2``."""
    keras.utils.set_random_seed(3)
    layer = QDense(4, kernel_quantizer=cls(bits=3, second_moment_decay=0.75))
    model = keras.Sequential([keras.Input((6,)), layer])
    model.compile(keras.optimizers.SGD(0.0), keras.losses.MeanSquaredError(reduction="sum"))
    x, _ = _data(32, seed=4)
    y = np.random.default_rng(4).normal(size=(32, 4)).astype(np.float32)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    q = layer.kernel_quantizer
    w = layer.kernel.numpy().astype(np.float64)
    wq = q(layer.kernel, training=False).numpy().astype(np.float64)  # the stored exponent: the step's
    e = q.exponent().numpy().astype(np.float64)
    np.testing.assert_array_equal(wq, 2.0 ** e * np.clip(np.rint(w / 2.0 ** e), -3, 3))
    keep = np.abs(np.rint(w / 2.0 ** e)) <= 3
    x64 = x.astype(np.float64)
    g = 2.0 / 4 * x64.T @ (x64 @ wq + layer.bias.numpy() - y)
    np.testing.assert_allclose(q.state["m2"].numpy(), 0.75 + 0.25 * np.where(keep, g ** 2, 0.0), rtol=1e-4)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_state_survives_save_and_load_model(trained_model, tmp_path, suffix):
    model, _ = trained_model
    path = str(tmp_path / f"model{suffix}")
    model.save(path)
    loaded = keras.models.load_model(path)
    before, after = _quantizer_state(model), _quantizer_state(loaded)
    assert sorted(before) == sorted(after) and len(before) == 15
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    x, _ = _data(8, seed=1)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), model(x, training=False).numpy())
    assert loaded.layers[2].kernel_quantizer.get_config() == model.layers[2].kernel_quantizer.get_config()


def test_state_survives_a_checkpoint(trained_model, tmp_path):
    model, _ = trained_model
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    fresh = _model(seed=1)
    fresh(np.zeros((1, 6), np.float32))
    status = tf.train.Checkpoint(model=fresh).restore(path)
    status.assert_existing_objects_matched()
    before, after = _quantizer_state(model), _quantizer_state(fresh)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


# ------------------------------------------------------------------- tfmot
def test_tfmot_quantize_apply_with_the_adapter(tmp_path):
    import tensorflow_model_optimization as tfmot

    from keras_coherence.quantization import TFMOTQuantizer

    tq_keras = tfmot.quantization.keras

    class KernelConfig(tq_keras.QuantizeConfig):
        def __init__(self, quantizer):
            self.quantizer = quantizer

        def get_weights_and_quantizers(self, layer):
            return [(layer.kernel, self.quantizer)]

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            layer.kernel = quantize_weights[0]

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {"quantizer": keras.utils.serialize_keras_object(self.quantizer)}

        @classmethod
        def from_config(cls, config):
            return cls(keras.utils.deserialize_keras_object(
                config["quantizer"], module_objects={"TFMOTQuantizer": TFMOTQuantizer}))

    adapter = TFMOTQuantizer(LearnedPo2(bits=4))
    assert isinstance(adapter, tq_keras.quantizers.Quantizer)
    assert TFMOTQuantizer.from_config(adapter.get_config()) == adapter
    keras.utils.set_random_seed(0)
    annotated = tq_keras.quantize_annotate_model(keras.Sequential([
        keras.Input((6,)),
        tq_keras.quantize_annotate_layer(keras.layers.Dense(4), KernelConfig(TFMOTQuantizer("msqe_po2"))),
        tq_keras.quantize_annotate_layer(keras.layers.Dense(2), KernelConfig(adapter)),
    ]))
    with tq_keras.quantize_scope({"KernelConfig": KernelConfig, "TFMOTQuantizer": TFMOTQuantizer}):
        qmodel = tq_keras.quantize_apply(annotated)
    x, y = _data()
    qmodel.compile(keras.optimizers.SGD(0.05), "mse")
    qmodel.fit(x, y, batch_size=16, epochs=1, verbose=0)
    wrappers = [layer for layer in qmodel.layers if isinstance(layer, tq_keras.QuantizeWrapperV2)]
    assert len(wrappers) == 2
    names = {w.name.split("/")[-1].split(":")[0] for w in wrappers[1].weights}
    assert {"kernel_exponent", "kernel_log2_scale", "kernel_m2", "kernel_frozen"} <= names
    h = x[:4]
    for wrapper in wrappers:
        kernel, quantizer, weights = wrapper._weight_vars[0]
        assert float(weights["initialized"].numpy()) == 1.0
        codes = quantizer.integer_codes(kernel, weights).numpy()
        assert np.abs(codes).max() <= 7
        out = wrapper(h, training=False).numpy()
        ref = h @ (quantizer.scale(weights).numpy() * codes) + wrapper.layer.bias.numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        h = out
    # One more training call through the tfmot wrapper with a known upstream gradient G:
    # the quantized kernel's gradient is h^T G, and m2 takes one EMA step of its square.
    kernel, quantizer, weights = wrappers[0]._weight_vars[0]
    h, upstream = x[:8], np.random.default_rng(9).normal(size=(8, 4)).astype(np.float32)
    before = weights["m2"].numpy().astype(np.float64)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrappers[0](h, training=True) * upstream)
    tape.gradient(loss, wrappers[0].trainable_weights)
    e = quantizer.exponent(weights).numpy().astype(np.float64)
    keep = np.abs(np.rint(kernel.numpy() / 2.0 ** e)) <= 7
    g = h.astype(np.float64).T @ upstream
    decay = quantizer.quantizer.second_moment_decay
    np.testing.assert_allclose(weights["m2"].numpy(), decay * before + (1 - decay) * np.where(keep, g ** 2, 0.0),
                               rtol=1e-5)
    quantizer, weights = wrappers[1]._weight_vars[0][1:]
    quantizer.freeze(weights)
    assert float(weights["frozen"].numpy()) == 1.0
    with tq_keras.quantize_scope({"KernelConfig": KernelConfig, "TFMOTQuantizer": TFMOTQuantizer}):
        qmodel.save(str(tmp_path / "q.h5"))
        loaded = keras.models.load_model(str(tmp_path / "q.h5"))
    for a, b in zip(qmodel.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


# ------------------------------------------------------- MirroredStrategy
_MIRRORED_SCRIPT = r'''
import json, os, sys
import numpy as np
sys.path.insert(0, os.environ["QTEST_DIR"])
import keras_coherence
from keras_coherence._keras import keras, tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from test_quantizers import _data, _model, _quantizer_state

x, y = _data()
out = {}
for label, strategy in (("one", tf.distribute.get_strategy()),
                        ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    with strategy.scope():
        model = _model()
        model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    out[label] = {k: v.tolist() for k, v in _quantizer_state(model).items()}
    out[label]["replicas"] = strategy.num_replicas_in_sync
print(json.dumps(out))
'''


def test_quantizers_train_under_mirrored_strategy():
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", QTEST_DIR=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    one, mirrored = res["one"], res["mirrored"]
    assert mirrored.pop("replicas") == 2 and one.pop("replicas") == 1
    for k in one:
        a, b = np.array(one[k]), np.array(mirrored[k])
        assert np.all(np.isfinite(b)), k
        if k.endswith("m2"):  # the mean over replicas of per-replica squared gradients
            assert np.all(b < 1.0), k
        else:
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=k)
