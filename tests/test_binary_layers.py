"""Low-memory binary layers: gradients against independent references, models, fit."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras_coherence as kc  # first: it selects Keras 2 (tf_keras) for larq
import larq as lq  # noqa: E402  (a required dependency)
from keras_coherence.binary import config as C
from keras_coherence.binary import layers as bl
from keras_coherence.binary import models as bm
from keras_coherence.binary import ops
from reference import tape_grads

tf, keras = kc.tf, kc.keras

OFF = C.LowMemoryConfig(binary_activation_retention=False, l1_batchnorm=False,
                        binarize_weight_grads=False, activation_grad="float32",
                        latent_weights="float32")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _np_sign(a):
    return np.where(a >= 0, 1.0, -1.0).astype(np.float32)


def _ste_reference(x, w, first_layer=False):
    """Standard STE formulation with larq's own quantizers and autodiff."""
    xq = x if first_layer else lq.quantizers.SteSign()(x)
    return tf.matmul(xq, lq.quantizers.SteSign()(w))


# ------------------------------------------------------------------ config / errors


def test_config_validation_and_methods():
    with pytest.raises(ValueError, match="activation_grad"):
        C.LowMemoryConfig(activation_grad="int4")
    with pytest.raises(ValueError, match="must be True or False"):
        C.LowMemoryConfig(l1_batchnorm="yes")
    with pytest.raises(ValueError, match="Unknown training method"):
        C.resolve_method("fast")
    with pytest.raises(ValueError, match="Unknown LowMemoryConfig fields"):
        C.resolve_method({"bogus": 1})
    cfg = C.LowMemoryConfig(activation_grad="po2")
    assert C.resolve_method(cfg.get_config()) == cfg
    assert C.method_name("low_memory_po2") == "low_memory_po2"
    assert C.method_name(OFF) == "standard_device"  # every technique off: the preset
    assert C.method_name(C.LowMemoryConfig(activation_grad="float32")) == "low_memory(custom)"
    assert cfg.po2_exponent_range == (-8, 7)
    with pytest.raises(ValueError, match="Unknown binary model"):
        bm.build_binary_model("alexnet")
    with pytest.raises(ValueError, match="Unknown training method"):
        bm.mlp(method="bogus")


# ------------------------------------------------------------------ dense gradients


@pytest.mark.parametrize("first_layer", [False, True])
def test_dense_everything_off_equals_ste_autodiff(first_layer):
    x = _rng(0).normal(size=(5, 7)) * 1.5
    w = _rng(1).normal(size=(7, 3)) * 0.9
    ours = tape_grads(lambda a, b: ops.binary_matmul(a, b, OFF, first_layer), x, w)
    ref = tape_grads(lambda a, b: _ste_reference(a, b, first_layer), x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_dense_retention_matches_numpy_formula_from_signs():
    cfg = C.LowMemoryConfig(binarize_weight_grads=False, activation_grad="float32",
                            latent_weights="float32", l1_batchnorm=False)
    x = (_rng(0).normal(size=(6, 5)) * 1.5).astype(np.float32)
    w = (_rng(1).normal(size=(5, 4)) * 0.9).astype(np.float32)
    z, dx, dw, g = tape_grads(lambda a, b: ops.binary_matmul(a, b, cfg), x, w)
    sx, sw = _np_sign(x), _np_sign(w)
    np.testing.assert_allclose(z, sx @ sw, atol=1e-5)
    np.testing.assert_allclose(dx, (g @ sw.T) * (np.abs(x) <= 1), atol=1e-5)
    np.testing.assert_allclose(dw, (sx.T @ g) * (np.abs(w) <= 1), atol=1e-5)


def test_dense_binarized_weight_grads_fp16_activation_grads():
    cfg = C.LowMemoryConfig(latent_weights="float32")
    x = (_rng(0).normal(size=(6, 5)) * 1.5).astype(np.float32)
    w = (_rng(1).normal(size=(5, 4)) * 0.9).astype(np.float32)
    _, dx, dw, g = tape_grads(lambda a, b: ops.binary_matmul(a, b, cfg), x, w)
    g16 = g.astype(np.float16).astype(np.float32)
    sx, sw = _np_sign(x), _np_sign(w)
    np.testing.assert_allclose(dx, (g16 @ sw.T) * (np.abs(x) <= 1), atol=1e-5)
    expected = _np_sign(sx.T @ g16) / math.sqrt(w.size) * (np.abs(w) <= 1)
    np.testing.assert_allclose(dw, expected, atol=1e-7)


def test_float16_latent_weights_round_forward_and_gradient():
    cfg = C.LowMemoryConfig(binarize_weight_grads=False, activation_grad="float32")
    w = np.array([[1.0 + 2 ** -12, -0.3]], np.float32)   # rounds to 1.0 in float16
    _, _, dw, g = tape_grads(lambda a, b: ops.binary_matmul(a, b, cfg, first_layer=True),
                         np.array([[0.1234567]], np.float32), w)
    # |w16| <= 1 -> the STE mask passes the first entry; float32 would block it
    expected = (np.float32(0.1234567) * g).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(dw, expected, rtol=1e-3)


def _np_po2(g, bits=4, bias=8):
    g = np.asarray(g, np.float64)
    top = np.abs(g).max()
    if top == 0:
        return g
    shift = bias - np.round(np.log2(top))
    v = g * 2.0 ** shift
    with np.errstate(divide="ignore"):
        e = np.clip(np.round(np.log2(np.abs(v))), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return np.sign(v) * 2.0 ** e * 2.0 ** -shift


@pytest.mark.parametrize("bits,bias", [(4, 8), (4, 6), (3, 8)])
def test_po2_round_matches_numpy(bits, bias):
    g = _rng(bits + bias).normal(size=(50,)) * np.exp(_rng(3).normal(size=(50,)) * 3)
    g[:3] = 0.0
    ours = ops.po2_round(tf.constant(g, tf.float32), bits, bias).numpy()
    np.testing.assert_allclose(ours, _np_po2(g.astype(np.float32), bits, bias), rtol=1e-6)
    nonzero = ours[ours != 0]
    assert np.allclose(np.log2(np.abs(nonzero)), np.round(np.log2(np.abs(nonzero))))
    assert np.all(ops.po2_round(tf.zeros((3,))).numpy() == 0)


def test_po2_activation_gradients_in_dense():
    cfg = C.LowMemoryConfig(activation_grad="po2", binarize_weight_grads=False,
                            latent_weights="float32")
    x = (_rng(0).normal(size=(6, 5)) * 1.5).astype(np.float32)
    w = (_rng(1).normal(size=(5, 4)) * 0.9).astype(np.float32)
    _, dx, dw, g = tape_grads(lambda a, b: ops.binary_matmul(a, b, cfg), x, w)
    gq = _np_po2(g).astype(np.float32)
    np.testing.assert_allclose(dx, (gq @ _np_sign(w).T) * (np.abs(x) <= 1), rtol=1e-5)
    np.testing.assert_allclose(dw, (_np_sign(x).T @ gq) * (np.abs(w) <= 1), rtol=1e-5)


# ------------------------------------------------------------------ conv gradients


@pytest.mark.parametrize("size,k,stride,padding", [
    (7, 3, 1, "VALID"), (7, 3, 1, "SAME"), (8, 3, 2, "SAME"), (7, 3, 2, "VALID"),
    (5, 1, 1, "VALID")])
@pytest.mark.parametrize("first_layer", [False, True])
def test_conv_everything_off_equals_ste_autodiff(size, k, stride, padding, first_layer):
    x = _rng(0).normal(size=(2, size, size, 3)) * 1.5
    w = _rng(1).normal(size=(k, k, 3, 4)) * 0.9

    def ref(a, b):
        aq = a if first_layer else lq.quantizers.SteSign()(a)
        return tf.nn.conv2d(aq, lq.quantizers.SteSign()(b), stride, padding)

    ours = tape_grads(lambda a, b: ops.binary_conv2d(a, b, stride, padding, OFF, first_layer),
                  x, w)
    for a, b in zip(ours, tape_grads(ref, x, w)):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("size,k,dilation,padding", [
    (9, 3, 2, "VALID"), (9, 3, 2, "SAME"), (10, 2, 3, "SAME"), (11, 3, (2, 3), "VALID")])
@pytest.mark.parametrize("first_layer", [False, True])
def test_dilated_conv_equals_ste_autodiff(size, k, dilation, padding, first_layer):
    """Atrous convolutions: forward and both gradients equal autodiff of larq's SteSign
    formulation through ``tf.nn.convolution`` (what Keras's dilated Conv2D runs)."""
    x = _rng(0).normal(size=(2, size, size, 3)) * 1.5
    w = _rng(1).normal(size=(k, k, 3, 4)) * 0.9

    def ref(a, b):
        aq = a if first_layer else lq.quantizers.SteSign()(a)
        return tf.nn.convolution(aq, lq.quantizers.SteSign()(b), padding=padding,
                                 dilations=dilation)

    ours = tape_grads(lambda a, b: ops.binary_conv2d(a, b, 1, padding, OFF, first_layer,
                                                 dilations=dilation), x, w)
    for a, b in zip(ours, tape_grads(ref, x, w)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def _conv_dilations_in_gradient_graph(layer, shape):
    """``{op type: dilations}`` of every Conv2D-family node of one training step."""
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, [x] + layer.trainable_variables)

    graph = step.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    nodes = [(op.type, op.node_def) for op in graph.get_operations()]
    for fn in graph._functions.values():
        nodes += [(n.op, n) for n in fn.definition.node_def]
    return [(kind, list(node.attr["dilations"].list.i)) for kind, node in nodes
            if kind.startswith("Conv2D")]


@pytest.mark.parametrize("strides,dilation", [(2, 1), (1, 2)])
def test_no_dilated_conv2d_kernel_in_forward_or_backward(strides, dilation):
    """Without oneDNN, TF's CPU Conv2D / Conv2DBackpropInput kernels have no dilation on
    CPUs without AVX-512: every conv node of a strided (its filter gradient dilates by the
    stride) or atrous BinaryConv2D step must have dilations 1 (``tf.nn.convolution`` does
    the dilation with SpaceToBatchND / BatchToSpaceND)."""
    layer = bl.BinaryConv2D(4, 3, strides=strides, dilation_rate=dilation, padding="same")
    convs = _conv_dilations_in_gradient_graph(layer, (2, 9, 9, 3))
    assert convs, "no convolution traced"
    assert all(d == [1, 1, 1, 1] for _, d in convs), convs


_NO_ONEDNN_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import larq as lq
    from keras_coherence._keras import tf
    from keras_coherence.binary import config as C, ops
    off = C.LowMemoryConfig(binary_activation_retention=False, l1_batchnorm=False,
                            binarize_weight_grads=False, activation_grad="float32",
                            latent_weights="float32")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 9, 9, 3)) * 1.5, tf.float32)
    w0 = rng.normal(size=(3, 3, 3, 4)).astype("float32") * 0.9
    out = {}
    for name, stride, dilation in (("strided", 2, 1), ("dilated", 1, 2)):
        results = []
        for fn in (lambda a, b: ops.binary_conv2d(a, b, stride, "SAME", off, dilations=dilation),
                   lambda a, b: tf.nn.convolution(lq.quantizers.SteSign()(a),
                                                  lq.quantizers.SteSign()(b), strides=stride,
                                                  padding="SAME", dilations=dilation)):
            w = tf.Variable(w0)
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x, w)
                loss = tf.reduce_sum(y * tf.sin(y))
            results.append([y.numpy()] + [g.numpy() for g in tape.gradient(loss, [x, w])])
        out[name] = max(float(np.abs(a - b).max()) for a, b in zip(*results))
    print(json.dumps(out))
""")


def test_strided_and_dilated_gradients_without_onednn():
    """The same gradients with TF_ENABLE_ONEDNN_OPTS=0 (read when TensorFlow is imported,
    hence a fresh process): TF's plain Eigen kernels, as on CPUs without AVX-512."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _NO_ONEDNN_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"strided", "dilated"}
    assert max(diffs.values()) < 1e-4, diffs


def test_binary_conv_dilation_rate_shapes_config_and_errors():
    layer = bl.BinaryConv2D(4, 3, dilation_rate=2, padding="valid")
    assert layer(tf.zeros((1, 9, 9, 2))).shape == (1, 5, 5, 4)         # 9 - (3-1)*2
    assert layer.compute_output_shape((1, 9, 9, 2)) == (1, 5, 5, 4)
    clone = bl.BinaryConv2D.from_config(layer.get_config())
    assert clone.dilation_rate == (2, 2) and clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="not both"):
        bl.BinaryConv2D(4, 3, strides=2, dilation_rate=2)
    with pytest.raises(ValueError, match="dilation_rate=0"):
        bl.BinaryConv2D(4, 3, dilation_rate=0)
    with pytest.raises(ValueError, match="not both"):
        ops.binary_conv2d(tf.zeros((1, 9, 9, 2)), tf.zeros((3, 3, 2, 4)), 2, "SAME", OFF,
                          dilations=2)


def test_conv_low_memory_weight_grad_is_binarized():
    cfg = C.LowMemoryConfig(latent_weights="float32", activation_grad="float32")
    x = _rng(0).normal(size=(2, 6, 6, 3)) * 1.5
    w = _rng(1).normal(size=(3, 3, 3, 4)) * 0.9
    ref = tape_grads(lambda a, b: ops.binary_conv2d(a, b, 1, "SAME", OFF), x, w)
    _, dx, dw, _ = tape_grads(lambda a, b: ops.binary_conv2d(a, b, 1, "SAME", cfg), x, w)
    np.testing.assert_allclose(dx, ref[1], atol=2e-5)
    inside = np.abs(w) <= 1      # the float reference is already masked: zero outside
    expected = _np_sign(ref[2]) / math.sqrt(w.size) * inside
    np.testing.assert_allclose(dw, expected, atol=1e-7)


# ------------------------------------------------------------------ l1 batch norm


def _np_l1bn_backward(x, dy, eps):
    axes = tuple(range(x.ndim - 1))
    mu = x.mean(axes)
    sigma = np.abs(x - mu).mean(axes) + eps
    xh = (x - mu) / sigma
    s = np.abs(xh).mean(axes)
    d = dy / sigma
    sg = _np_sign(xh)
    return d - d.mean(axes) - sg * (d * sg).mean(axes) * s, xh


@pytest.mark.parametrize("shape", [(16, 5), (3, 4, 4, 6)])
def test_l1_batchnorm_forward_backward_match_paper_formula(shape):
    cfg = C.LowMemoryConfig(activation_grad="float32", latent_weights="float32")
    layer = bl.L1BatchNormalization(method=cfg, epsilon=1e-6)
    x = tf.constant(_rng(0).normal(size=shape) * 2 + 0.5, tf.float32)
    dy = _rng(1).normal(size=shape).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * dy)
    dx, dbeta = tape.gradient(loss, [x, layer.beta])
    ref_dx, xh = _np_l1bn_backward(x.numpy().astype(np.float64), dy, 1e-6)
    np.testing.assert_allclose(y.numpy(), xh, atol=1e-5)
    np.testing.assert_allclose(dx.numpy(), ref_dx, atol=1e-5)
    np.testing.assert_allclose(dbeta.numpy(), dy.reshape(-1, shape[-1]).sum(0), rtol=1e-5)
    # moving statistics moved by (1 - momentum) towards the batch's
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               0.1 * x.numpy().reshape(-1, shape[-1]).mean(0), rtol=1e-5)
    inference = layer(x, training=False).numpy()
    assert np.all(np.isfinite(inference))


def test_l1_batchnorm_float16_rounds_incoming_gradient():
    layer = bl.L1BatchNormalization(method=C.LowMemoryConfig(latent_weights="float32"))
    x = tf.constant(_rng(0).normal(size=(8, 3)), tf.float32)
    dy = (_rng(1).normal(size=(8, 3)) * 1.001).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * dy)
    dx = tape.gradient(loss, x).numpy()
    ref, _ = _np_l1bn_backward(x.numpy().astype(np.float64),
                               dy.astype(np.float16).astype(np.float64), 1e-6)
    np.testing.assert_allclose(dx, ref, atol=1e-5)


# ------------------------------------------------------------------ builtin-only graph

_FLEX_OPS = {"Conv2DBackpropFilter", "ReluGrad", "SignGrad", "FusedBatchNormGradV3",
             "PyFunc", "EagerPyFunc", "TopKV2", "MaxPoolGrad"}


def test_training_step_graph_has_no_autodiff_kernel_ops():
    model = bm.mlp((4, 4, 1), 3, method="low_memory_po2", hidden=(6,), dense_as_conv=True)
    conv = keras.Sequential([keras.Input((6, 6, 2)),
                             bl.BinaryConv2D(3, 3, strides=2, padding="same"),
                             bl.L1BatchNormalization()])

    for net, shape in ((model, (2, 4, 4, 1)), (conv, (2, 6, 6, 2))):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(net(x, training=True) ** 2)
            return tape.gradient(loss, net.trainable_variables)

        graph = step.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
        names = {op.type for op in graph.get_operations()}
        for fn in graph._functions.values():
            names |= {n.op for n in fn.definition.node_def}
        assert not names & _FLEX_OPS, names & _FLEX_OPS


# ------------------------------------------------------------------ layers and models


def test_layers_serialize_and_round_trip():
    for layer in (bl.BinaryDense(3, first_layer=True, method="low_memory_po2"),
                  bl.BinaryConv2D(2, 3, strides=2, padding="same", method="standard"),
                  bl.L1BatchNormalization(momentum=0.8)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="padding"):
        bl.BinaryConv2D(2, 3, padding="full")
    with pytest.raises(ValueError, match="units"):
        bl.BinaryDense(0)


@pytest.mark.parametrize("dense_as_conv", [False, True])
def test_standard_and_low_memory_models_share_layer_names(dense_as_conv):
    std = bm.mlp(method="standard", dense_as_conv=dense_as_conv)
    low = bm.mlp(method="low_memory", dense_as_conv=dense_as_conv)
    assert [l.name for l in std.layers] == [l.name for l in low.layers]
    assert std.get_layer("fc_2").kernel.shape == low.get_layer("fc_2").kernel.shape
    assert isinstance(low.get_layer("bn_fc_1"), bl.L1BatchNormalization)
    kind = bl.BinaryConv2D if dense_as_conv else bl.BinaryDense
    assert isinstance(low.get_layer("fc_1"), kind) and low.get_layer("fc_1").first_layer
    no_l1 = bm.mlp(method=C.LowMemoryConfig(l1_batchnorm=False))
    assert isinstance(no_l1.get_layer("bn_fc_1"), keras.layers.BatchNormalization)


def test_conv_models_build():
    assert bm.cnv(method="low_memory").output_shape == (None, 10)
    with pytest.raises(ValueError, match="at least 32x32"):   # 28 would leave conv_6 a 2x2 input
        bm.cnv((31, 31, 3))
    small = bm.resnet_e18((32, 32, 3), 10, method="low_memory", width=8)
    assert small.output_shape == (None, 10)
    assert sum(isinstance(l, bl.BinaryConv2D) for l in small.layers) == 16


# ------------------------------------------------------------------ fit


def _tiny_data(n=64):
    rng = _rng(5)
    x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
    y = (x.reshape(n, -1)[:, 0] > 0).astype(np.int64)
    return x, y


@pytest.mark.parametrize("method", ["standard", "low_memory", "low_memory_po2"])
@pytest.mark.parametrize("optimizer", ["adam", "bop"])
def test_fit_with_adam_and_bop(method, optimizer):
    from keras_coherence.binary.training import make_optimizer
    x, y = _tiny_data()
    model = bm.mlp((4, 4, 1), 2, method=method, hidden=(16, 16))
    model.compile(make_optimizer(optimizer, 1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    changed = [not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights)]
    assert all(changed)
    if optimizer == "bop":
        # Bop updates a binary kernel only by flipping it, w -> -sign(w) (larq's Bop): an entry
        # is its initial value or +-1 (flipped once or more), and some flipped
        index = [w.name for w in model.trainable_weights].index(model.get_layer("fc_2").kernel.name)
        w0, kernel = before[index], model.get_layer("fc_2").kernel.numpy()
        moved = kernel != w0
        assert np.all(np.abs(kernel[moved]) == 1.0) and moved.any()
        assert np.any(kernel[moved] == -np.where(w0[moved] >= 0, 1.0, -1.0))  # a real flip


def test_training_step_converts_to_builtin_tflite_and_trains_in_litert(tmp_path):
    """The hand-written backward passes lower to TFLite builtins only (no Flex)."""
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    net = keras.Sequential([
        keras.Input((6, 6, 2)),
        bl.BinaryConv2D(3, 3, padding="same", first_layer=True), bl.L1BatchNormalization(),
        bl.BinaryConv2D(4, 3, strides=2, padding="same", method="low_memory_po2"),
        bl.L1BatchNormalization(), keras.layers.Flatten(),
        bl.BinaryDense(3), bl.L1BatchNormalization()])

    class Trainer(tf.Module):
        def __init__(self, model):
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec((4, 6, 6, 2)),
                                      tf.TensorSpec((4,), tf.int64)])
        def train(self, x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    y, self.model(x, training=True), from_logits=True))
            grads = tape.gradient(loss, self.model.trainable_variables)
            for var, grad in zip(self.model.trainable_variables, grads):
                var.assign_sub(0.1 * grad)
            return {"loss": loss}

    trainer = Trainer(net)
    tf.saved_model.save(trainer, str(tmp_path),
                        signatures={"train": trainer.train.get_concrete_function()})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path),
                                                         signature_keys=["train"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    runner = interpreter_mod.Interpreter(model_content=converter.convert()) \
        .get_signature_runner("train")   # holds the weights as saved, before any step
    x = _rng(0).normal(size=(4, 6, 6, 2)).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    losses = [float(runner(x=x, y=y)["loss"]) for _ in range(6)]
    # the same steps in TensorFlow from the same weights (other kernels, same numbers)
    tf_losses = [float(trainer.train(tf.constant(x), tf.constant(y, tf.int64))["loss"])
                 for _ in range(6)]
    np.testing.assert_allclose(losses, tf_losses, rtol=1e-4, atol=1e-5)
    assert min(losses[1:]) < losses[0]


@pytest.mark.parametrize("module", ["config", "ops", "layers", "models", "training", "memory"])
def test_docstring_examples(module):
    import doctest
    import importlib
    mod = importlib.import_module(f"keras_coherence.binary.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
