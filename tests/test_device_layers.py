"""Device layers (keras_coherence.binary.real_ops / layers.Device*) and the
``"standard_device"`` baseline.

* Each op's forward and gradients equal TF autodiff of the plain TF / Keras op (the
  independent reference), with ties for the pools, odd sizes, "same"/"valid",
  overlapping windows.
* The standard_device models compute the standard (larq + Keras) models' loss and
  gradients from the same weights.
* A standard_device CNV exports with LCE (bconvs, binary max pool) and agrees with Keras.
* MLP / CNV / BinaryNet / ResNetE-18 with "standard_device" convert to builtin-only
  TFLite training models (one conversion per model, shared through a module fixture); one
  LiteRT train step of the standard_device CNV and ResNetE-18 reports Keras
  ``train_on_batch``'s loss.

ResNetE-18 is converted as a cut-down model with one unit of each kind, standard_device
and low_memory, built from the blocks ``models.resnet_e18`` uses (a test checks it has
exactly the full model's layer kinds, strides and paddings): converting the full model
takes ~75 s of MLIR work, which grows with the number of ops, not with the widths. (The
low-memory one's stride-2 binary convolution is in no other export.)
"""
import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence.binary import config as C
from keras_coherence.binary import export_lce, export_training
from keras_coherence.binary import layers as bl
from keras_coherence.binary import models as bm
from keras_coherence.binary import real_ops

tf, keras = kc.tf, kc.keras

BATCH, LR = 4, 1e-3


def _grads(fn, *args, g=None):
    """``(y, [d(sum(y * g))/d arg])`` with ``g`` random (fixed seed) when not given."""
    args = [tf.constant(a, tf.float32) for a in args]
    with tf.GradientTape() as tape:
        for a in args:
            tape.watch(a)
        y = fn(*args)
        if g is None:
            g = np.random.default_rng(9).normal(size=y.shape).astype(np.float32)
        loss = tf.reduce_sum(y * g)
    return y.numpy(), [d.numpy() for d in tape.gradient(loss, args)]


def _check(ours, ref, atol=1e-5):
    np.testing.assert_allclose(ours[0], ref[0], atol=atol, rtol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------ ops vs autodiff
@pytest.mark.parametrize("shape,kernel,strides,padding,dilations", [
    ((2, 11, 13, 3), (7, 7, 3, 5), 2, "SAME", 1),     # the ResNet stem, odd sizes
    ((2, 9, 9, 4), (1, 1, 4, 6), 1, "VALID", 1),      # the shortcut 1x1
    ((3, 8, 7, 2), (3, 3, 2, 4), 2, "VALID", 1),
    ((2, 9, 10, 2), (3, 2, 2, 3), 1, "SAME", 2),
])
def test_conv2d_equals_autodiff(shape, kernel, strides, padding, dilations):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=shape), rng.normal(size=kernel)
    ref = _grads(lambda a, b: tf.nn.convolution(a, b, strides, padding, dilations=dilations), x, w)
    ours = _grads(lambda a, b: real_ops.conv2d(a, b, strides, padding, dilations), x, w)
    _check(ours, ref, atol=1e-4)


def test_conv2d_split_over_the_batch_equals_autodiff():
    """Under a scratch budget (as the device export traces it) the batch is split: the
    same numbers."""
    from keras_coherence.binary import ops

    rng = np.random.default_rng(8)
    x, w = rng.normal(size=(5, 9, 9, 3)), rng.normal(size=(7, 7, 3, 4))
    ref = _grads(lambda a, b: tf.nn.convolution(a, b, 2, "SAME"), x, w)
    with ops.scratch_budget(4 * 5 * 5 * 49 * 3 * 2):   # two examples per forward chunk
        ours = _grads(lambda a, b: real_ops.conv2d(a, b, 2, "SAME"), x, w)
        chunks = ops.batch_chunks(5, 4 * 5 * 5 * 49 * 3)
    assert len(chunks) == 3
    _check(ours, ref, atol=1e-4)


def test_device_conv2d_layer_equals_keras_conv2d():
    x = np.random.default_rng(1).normal(size=(2, 9, 9, 3)).astype(np.float32)
    ref_layer = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=True)
    layer = bl.DeviceConv2D(4, 3, strides=2, padding="same", use_bias=True)
    ref_layer.build(x.shape), layer.build(x.shape)
    weights = [np.random.default_rng(2).normal(size=w.shape) for w in ref_layer.get_weights()]
    ref_layer.set_weights(weights), layer.set_weights(weights)

    def run(lyr):
        with tf.GradientTape() as tape:
            y = lyr(tf.constant(x))
            loss = tf.reduce_sum(y * y)
        return [y.numpy()] + [g.numpy() for g in tape.gradient(loss, lyr.trainable_weights)]

    for a, b in zip(run(layer), run(ref_layer)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="add a DeviceReLU"):
        bl.DeviceConv2D(4, 3, activation="relu")


def test_relu_equals_autodiff_with_zeros():
    x = np.array([[-1.0, 0.0, 0.5], [2.0, -0.0, -3.0]], np.float32)
    _check(_grads(real_ops.relu, x), _grads(tf.nn.relu, x), atol=0)
    with pytest.raises(ValueError, match="is a ReLU"):
        bl.DeviceReLU("tanh")


POOLS = [((2, 7, 9, 3), 3, 2, "SAME"), ((2, 7, 9, 3), 3, 2, "VALID"), ((1, 6, 6, 2), 2, 1, "VALID"),
         ((2, 8, 8, 2), (2, 3), (1, 2), "SAME"), ((1, 5, 5, 1), 1, 2, "SAME"), ((2, 5, 7, 2), 2, 2, "SAME"),
         ((2, 16, 16, 2), 3, 2, "SAME")]


@pytest.mark.parametrize("shape,pool,strides,padding", POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_max_pool_grad(shape, pool, strides, padding, ties):
    """Ties (inputs in {-1, 0, 1}: equal maxima everywhere) go to the first maximum as in
    MaxPoolGrad; overlapping windows add up."""
    rng = np.random.default_rng(3)
    x = rng.integers(-1, 2, size=shape) if ties else rng.normal(size=shape)
    ref = _grads(lambda a: keras.layers.MaxPooling2D(pool, strides, padding.lower())(a), x)
    ours = _grads(lambda a: bl.DeviceMaxPooling2D(pool, strides, padding.lower())(a), x)
    _check(ours, ref, atol=1e-6)


@pytest.mark.parametrize("shape,pool,strides,padding", POOLS)
def test_avg_pool_equals_avg_pool_grad(shape, pool, strides, padding):
    x = np.random.default_rng(4).normal(size=shape)
    ref = _grads(lambda a: keras.layers.AveragePooling2D(pool, strides, padding.lower())(a), x)
    ours = _grads(lambda a: bl.DeviceAveragePooling2D(pool, strides, padding.lower())(a), x)
    _check(ours, ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 7, 4)])
def test_batch_norm_equals_keras_batch_norm(shape):
    """Training output, gradients (x, gamma, beta) and moving statistics of Keras's
    BatchNormalization (fused on images, where the moving variance is unbiased)."""
    rng = np.random.default_rng(5)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    channels = shape[-1]
    weights = [rng.uniform(0.5, 2, channels), rng.normal(size=channels), rng.normal(size=channels),
               rng.uniform(0.5, 2, channels)]

    def run(cls):
        layer = cls(momentum=0.9, epsilon=1e-4)
        layer.build(shape)
        layer.set_weights(weights)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * g)
        dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
        infer = layer(xt, training=False)
        return [y, dx, dgamma, dbeta, layer.moving_mean, layer.moving_variance, infer]

    for a, b in zip(run(bl.DeviceBatchNormalization), run(keras.layers.BatchNormalization)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)

    def moving_after_graph_step(cls):   # batch size unknown while tracing
        layer = cls(momentum=0.9, epsilon=1e-4)
        layer.build(shape)
        layer.set_weights(weights)
        step = tf.function(lambda t: layer(t, training=True),
                           input_signature=[tf.TensorSpec((None,) + shape[1:], tf.float32)])
        step(tf.constant(x))
        return layer.moving_mean.numpy(), layer.moving_variance.numpy()

    for a, b in zip(moving_after_graph_step(bl.DeviceBatchNormalization),
                    moving_after_graph_step(keras.layers.BatchNormalization)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_layers_serialize_and_subclass_keras():
    for layer, base in [(bl.DeviceBatchNormalization(momentum=0.9, epsilon=1e-4, name="a"),
                         keras.layers.BatchNormalization),
                        (bl.DeviceConv2D(3, 7, strides=2, padding="same", use_bias=False, name="b"),
                         keras.layers.Conv2D),
                        (bl.DeviceReLU(name="c"), keras.layers.Activation),
                        (bl.DeviceMaxPooling2D(3, 2, "same", name="d"), keras.layers.MaxPooling2D),
                        (bl.DeviceAveragePooling2D(2, name="e"), keras.layers.AveragePooling2D)]:
        assert isinstance(layer, base) and layer.builtin_backward
        clone = keras.layers.deserialize(keras.layers.serialize(layer))
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()


def test_real_ops_docstring_examples():
    import doctest

    result = doctest.testmod(real_ops, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ models
def test_standard_device_preset():
    cfg = C.resolve_method("standard_device")
    assert cfg == C.STANDARD_DEVICE == C.LowMemoryConfig.standard_device()
    assert (cfg.binary_activation_retention, cfg.l1_batchnorm, cfg.binarize_weight_grads,
            cfg.activation_grad, cfg.latent_weights) == (False, False, False, "float32", "float32")
    assert C.method_name(cfg) == "standard_device" and "standard_device" in C.METHODS
    std = bm.resnet_e18((32, 32, 3), 10, method="standard", width=4)
    assert not any(isinstance(l, bl.DEVICE_LAYERS + bl.LOW_MEMORY_LAYERS) for l in std.layers)
    dev = bm.resnet_e18((32, 32, 3), 10, method="standard_device", width=4)
    assert [l.name for l in dev.layers] == [l.name for l in std.layers]
    assert isinstance(dev.get_layer("stem_pool"), bl.DeviceMaxPooling2D)
    assert isinstance(bm.cnv(method="standard_device", filters=(2,) * 6, fc=(4, 4)).get_layer("pool_2"),
                      bl.DeviceMaxPooling2D)
    assert isinstance(bm.cnv(method="low_memory", filters=(2,) * 6, fc=(4, 4)).get_layer("pool_2"),
                      bl.LowMemoryMaxPooling2D)


def _step_grads(model, x, y):
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    return float(loss), {v.name: g.numpy() for v, g in zip(model.trainable_variables, grads)}


@pytest.mark.parametrize("build", [
    lambda method: bm.cnv(method=method, filters=(4, 4, 6, 6, 8, 8), fc=(16, 16)),
    lambda method: bm.binarynet((16, 16, 3), method=method, filters=(4, 4, 6, 6, 8, 8), fc=(16, 16)),
    lambda method: bm.resnet_e18((32, 32, 3), 10, method=method, width=4),
], ids=["cnv", "binarynet", "resnet_e18"])
def test_standard_device_computes_the_standard_step(build):
    """Same weights: the standard model (larq, Keras BN / pools / conv, autodiff) and the
    standard_device one (hand-written backward passes) give the same loss and gradients."""
    keras.utils.set_random_seed(0)
    std, dev = build("standard"), build("standard_device")
    dev.set_weights(std.get_weights())
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(BATCH,) + std.input_shape[1:]).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, BATCH).astype(np.int32))
    loss_s, grads_s = _step_grads(std, x, y)
    loss_d, grads_d = _step_grads(dev, x, y)
    assert loss_d == pytest.approx(loss_s, rel=1e-5, abs=1e-5)
    assert grads_d.keys() == grads_s.keys()
    for name in grads_s:
        np.testing.assert_allclose(grads_d[name], grads_s[name], rtol=1e-3, atol=1e-4, err_msg=name)


# ------------------------------------------------------------------ TFLite training export
def _mini_resnet_e18(method="standard_device"):
    """ResNetE-18 cut to one unit of each kind (the stem, an identity-shortcut unit, a
    downsampling unit, the head). The TFLite conversion's time grows with the number of
    ops (the full model's 16 binary units: ~75 s), not with the widths."""
    return bm.resnet_e18((32, 32, 3), 10, method=method, width=4, units_per_stage=(1, 1))


# one conversion per model in this file (each ~6-20 s of MLIR work), shared by the tests
EXPORTS = {
    "mlp": lambda: bm.mlp((8, 8, 1), method="standard_device", hidden=(8,)),
    "cnv": lambda: bm.cnv(method="standard_device", filters=(4, 4, 6, 6, 8, 8), fc=(16, 16)),
    "binarynet": lambda: bm.binarynet((8, 8, 3), method="standard_device", filters=(4,) * 6,
                                      fc=(8, 8)),
    "resnet_e18": _mini_resnet_e18,
    # the low-memory units too: its stride-2 binary conv is in no other export
    "resnet_e18_low_memory": lambda: _mini_resnet_e18("low_memory"),
}


@pytest.fixture(scope="module")
def exported():
    """``exported(name) -> (model, flatbuffer, ops)``: the standard_device model and its
    TFLite training export (same initial weights), converted once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            keras.utils.set_random_seed(1)
            model = EXPORTS[name]()
            flatbuffer = export_training.to_training_tflite(
                export_training.TrainingModule(model, learning_rate=LR, batch_size=BATCH))
            cache[name] = (model, flatbuffer, export_lce.tflite_ops(flatbuffer))
        return cache[name]

    return get


def test_mini_resnet_has_every_layer_kind_of_resnet_e18():
    full = bm.resnet_e18((32, 32, 3), 10, method="standard_device", width=4)
    mini = _mini_resnet_e18()
    assert {type(l) for l in mini.layers} == {type(l) for l in full.layers}
    kinds = lambda m: {(type(l).__name__, getattr(l, "strides", None), getattr(l, "padding", None))
                       for l in m.layers}
    assert kinds(mini) == kinds(full)
    binary_units = lambda m: [l.name for l in m.layers if l.name.endswith("_add")]
    assert binary_units(mini) == ["stage1_block1_conv1_add", "stage2_block1_conv1_add"]
    # the full model keeps larq-zoo's unit names, a downsampling shortcut opening stages 2-4
    assert binary_units(full) == [f"stage{s}_block{b}_conv{u}_add" for s in range(1, 5) for b in (1, 2)
                                  for u in (1, 2)]
    assert [l.name for l in full.layers if l.name.endswith("_sc_conv")] == [
        f"stage{s}_block1_conv1_sc_conv" for s in (2, 3, 4)]
    for bad in ((), (1, 0), (2.5,), (True,), 2, "22"):
        with pytest.raises(ValueError, match="units_per_stage"):
            bm.resnet_e18((32, 32, 3), 10, units_per_stage=bad)


@pytest.mark.device_export
@pytest.mark.parametrize("name", list(EXPORTS))
def test_builtin_only_training_model(exported, name):
    flatbuffer, ops = exported(name)[1:]
    assert export_lce.non_builtin_ops(flatbuffer) == [], ops
    assert not [op for op in ops if op.startswith("Flex")]
    if name != "mlp":
        assert {"TRANSPOSE_CONV", "CONV_2D", "MAX_POOL_2D"} <= set(ops), ops


@pytest.mark.device_export
@pytest.mark.parametrize("name", ["cnv", "resnet_e18"])
def test_litert_train_step_equals_keras(exported, name):
    from ai_edge_litert.interpreter import Interpreter

    model, flatbuffer, _ = exported(name)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, BATCH) + model.input_shape[1:]).astype(np.float32)
    y = rng.integers(0, 10, (2, BATCH)).astype(np.int32)
    train = Interpreter(model_content=flatbuffer).get_signature_runner("train")
    lite = [float(train(x=x[i], y=y[i])["loss"]) for i in range(2)]
    model.compile(keras.optimizers.Adam(LR), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ref = [float(model.train_on_batch(x[i], y[i])) for i in range(2)]
    assert lite[0] == pytest.approx(ref[0], abs=1e-5)
    assert lite[1] == pytest.approx(ref[1], abs=1e-3)   # after one Adam update on each side


@pytest.mark.device_export
def test_standard_device_cnv_exports_with_lce():
    """The device layers are Keras layers to the LCE export: bconvs, fused BN and the binary
    max pool as for the standard model; LCE's interpreter agrees with Keras."""
    keras.utils.set_random_seed(2)
    model = bm.cnv(method="standard_device", filters=(4,) * 6, fc=(8, 8))
    rng = np.random.default_rng(10)
    for layer in model.layers:   # statistics away from sign ties
        if isinstance(layer, bl.DeviceBatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 0.3, c), rng.normal(0, 1, c),
                               rng.uniform(0.5, 2, c)])
    x = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    flatbuffer = export_lce.to_lce(model)
    assert {"LceBconv2d", "LceBMaxPool2d"} <= set(export_lce.tflite_ops(flatbuffer))
    np.testing.assert_allclose(export_lce.lce_predict(flatbuffer, x), model.predict(x, verbose=0),
                               atol=1e-4)
