"""Every convolution path of the coherence engine and the aggregators, on every CPU.

Dilated, strided, ``same``/``valid``/``causal`` Conv1D, Conv2D, DepthwiseConv2D and
SeparableConv2D, each placed *after* a strided convolution so that the engine has to
backpropagate through the dilated layer's input. On CPUs without oneDNN (AMD EPYC
without AVX-512, or ``TF_ENABLE_ONEDNN_OPTS=0`` anywhere) a dilated raw ``Conv2D`` has
no input-gradient kernel; ``.ci/run`` runs this file a second time with oneDNN off.

References: per-example gradients one example at a time with ``tape.gradient``
(tests/reference.py), then numpy for m-coherence and for the winsorized update.
"""
import numpy as np
import pytest

import keras_coherence  # noqa: F401  (first: selects Keras 2 for larq)
import larq as lq
from keras_coherence._keras import keras
from keras_coherence.aggregation import with_aggregator
from keras_coherence.coherence import gradient_stats
from reference import coherence_reference, layer_map, per_example_grads

RTOL = 1e-4

# (name, layer factory, input rank): every kind x dilation x padding the rules support.
# Keras forbids strides > 1 together with dilation > 1, so strides appear undilated.
CASES = [
    ("conv2d_dil2_same", lambda: keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", name="probe"), 2),
    ("conv2d_dil2_valid", lambda: keras.layers.Conv2D(3, 2, dilation_rate=(2, 1), padding="valid", name="probe"), 2),
    ("conv2d_dil3_same_wide", lambda: keras.layers.Conv2D(4, 3, dilation_rate=(1, 3), padding="same", name="probe"), 2),
    ("conv2d_stride2_same", lambda: keras.layers.Conv2D(3, 3, strides=2, padding="same", name="probe"), 2),
    ("conv2d_stride_valid", lambda: keras.layers.Conv2D(3, (2, 3), strides=(2, 1), padding="valid", name="probe"), 2),
    ("depthwise_dil2_same", lambda: keras.layers.DepthwiseConv2D(3, dilation_rate=2, padding="same", name="probe"), 2),
    ("depthwise_dil2_valid_mult2", lambda: keras.layers.DepthwiseConv2D(
        2, dilation_rate=2, padding="valid", depth_multiplier=2, name="probe"), 2),
    ("depthwise_stride2_same", lambda: keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="probe"), 2),
    ("separable_dil2_same", lambda: keras.layers.SeparableConv2D(3, 3, dilation_rate=2, padding="same", name="probe"), 2),
    ("separable_dil2_valid", lambda: keras.layers.SeparableConv2D(4, 2, dilation_rate=2, padding="valid", name="probe"), 2),
    ("separable_stride2_same", lambda: keras.layers.SeparableConv2D(3, 3, strides=2, padding="same", name="probe"), 2),
    ("conv1d_dil2_causal", lambda: keras.layers.Conv1D(3, 3, dilation_rate=2, padding="causal", name="probe"), 1),
    ("conv1d_dil3_same", lambda: keras.layers.Conv1D(3, 2, dilation_rate=3, padding="same", name="probe"), 1),
    ("conv1d_dil2_valid", lambda: keras.layers.Conv1D(3, 3, dilation_rate=2, padding="valid", name="probe"), 1),
    ("conv1d_stride3_same", lambda: keras.layers.Conv1D(3, 3, strides=3, padding="same", name="probe"), 1),
    # more than 32 kernel inputs (9 x 4 channels): the wide-kernel formulations, which
    # differ with oneDNN on and off; larq's straight-through mask (|w| > 1 -> 0) as well
    ("conv1d_wide_dil2_same", lambda: keras.layers.Conv1D(3, 9, dilation_rate=2, padding="same", name="probe"), 1),
    ("larq_ste_conv2d_dil2_same", lambda: lq.layers.QuantConv2D(
        3, 3, dilation_rate=2, padding="same", kernel_quantizer="ste_sign",
        kernel_initializer=keras.initializers.RandomNormal(stddev=1.2), name="probe"), 2),
]


def _model(factory, rank, seed):
    """strided conv -> the probe layer (with a tanh) -> a second dilated conv -> head.

    The probe sits between two convolutions so that both its kernel rule and the
    gradient flowing *through* a dilated convolution into it are exercised."""
    keras.utils.set_random_seed(seed)
    if rank == 2:
        inp = keras.Input((13, 12, 2))
        h = keras.layers.Conv2D(4, 3, strides=(2, 1), padding="same", name="stem")(inp)
        h = factory()(h)
        h = keras.layers.Activation("tanh", name="act")(h)
        h = keras.layers.Conv2D(3, 2, dilation_rate=2, padding="same", name="after")(h)
        h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    else:
        inp = keras.Input((17, 2))
        h = keras.layers.Conv1D(4, 3, strides=2, padding="same", name="stem")(inp)
        h = factory()(h)
        h = keras.layers.Activation("tanh", name="act")(h)
        h = keras.layers.Conv1D(3, 2, dilation_rate=2, padding="causal", name="after")(h)
        h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inp, out)


def _data(rank, n, seed):
    rng = np.random.default_rng(seed)
    shape = (n, 13, 12, 2) if rank == 2 else (n, 17, 2)
    return rng.normal(size=shape).astype("float32"), rng.integers(0, 3, n)


@pytest.mark.parametrize("name,factory,rank", CASES, ids=[c[0] for c in CASES])
def test_gradient_stats_conv_paths_match_brute_force(name, factory, rank):
    x, y = _data(rank, 9, seed=len(name))
    model = _model(factory, rank, seed=3)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    stats = gradient_stats(model, x, y, batch_size=5)  # micro-batches 5 + 4
    ref_mc, ref_s, ref_q, ref_layers = coherence_reference(model, loss, x, y, layer_of=layer_map(model))
    np.testing.assert_allclose(stats.m_coherence, ref_mc, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_grad_sq_norm, ref_s, rtol=RTOL)
    np.testing.assert_allclose(stats.sum_sq_norms, ref_q, rtol=RTOL)
    assert set(stats.layers) == set(ref_layers) == {"stem", "probe", "after", "head"}
    for layer_name, value in ref_layers.items():
        np.testing.assert_allclose(stats.layers[layer_name].m_coherence, value, rtol=RTOL, err_msg=layer_name)


def _np_winsorized_mean(per_example, c):
    s = np.sort(per_example, axis=0)
    return np.clip(per_example, s[c], s[len(per_example) - 1 - c]).mean(0)


@pytest.mark.parametrize("name,factory,rank", [c for c in CASES if "dil" in c[0]],
                         ids=[c[0] for c in CASES if "dil" in c[0]])
def test_winsorized_step_conv_paths_match_brute_force(name, factory, rank):
    """One winsorized SGD step (per-example gradients through every dilated path)
    equals numpy's sort-and-clip of one-example-at-a-time gradients."""
    x, y = _data(rank, 10, seed=len(name) + 1)
    model = _model(factory, rank, seed=4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    grads = per_example_grads(model, loss, x, y)
    lr, c = 0.5, 2
    expected = [w - lr * _np_winsorized_mean(np.stack([g[k] for g in grads]), c)
                for k, w in enumerate(before)]
    wmodel = with_aggregator(model, f"winsorized:c={c}")
    wmodel.compile(keras.optimizers.SGD(lr), loss)
    wmodel.train_on_batch(x, y)
    for v, want in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-4, atol=1e-6, err_msg=v.name)

