"""LowMemoryMaxPooling2D / ops.max_pool2d: forward = tf.nn.max_pool2d, backward = TF's
MaxPoolGrad (the first maximum of each window gets the gradient), builtin ops only."""
import numpy as np
import pytest

import keras_coherence as kc
from keras_coherence.binary import layers as bl
from keras_coherence.binary import models as bm
from keras_coherence.binary import ops

tf, keras = kc.tf, kc.keras

CASES = [((2, 8, 8, 3), 2, "VALID"), ((2, 7, 9, 3), 2, "VALID"), ((2, 7, 9, 3), 2, "SAME"),
         ((1, 10, 11, 2), 3, "SAME"), ((1, 6, 6, 1), 3, "VALID")]


def _pool_and_grad(pool, x, g, graph=False):
    x = tf.constant(x, tf.float32)

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pool(x)
            loss = tf.reduce_sum(y * g)
        return y, tape.gradient(loss, x)

    y, dx = (tf.function(run) if graph else run)(x)
    return y.numpy(), dx.numpy()


def _np_first_max_grad(x, g, k, padding):
    """Reference backward: each output's gradient to the first (row-major) maximum of its
    window; 'SAME' windows are padded as TF pads (extra row/column after when odd)."""
    b, h, w, c = x.shape
    ho, wo = (h // k, w // k) if padding == "VALID" else (-(-h // k), -(-w // k))
    top = max((ho - 1) * k + k - h, 0) // 2 if padding == "SAME" else 0
    left = max((wo - 1) * k + k - w, 0) // 2 if padding == "SAME" else 0
    dx = np.zeros_like(x)
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    best = None
                    for di in range(k):
                        for dj in range(k):
                            r, s = i * k + di - top, j * k + dj - left
                            if 0 <= r < h and 0 <= s < w and (best is None or x[n, r, s, ch] > x[n, best[0], best[1], ch]):
                                best = (r, s)
                    dx[n, best[0], best[1], ch] += g[n, i, j, ch]
    return dx


@pytest.mark.parametrize("shape,k,padding", CASES)
def test_forward_and_gradient_equal_tf_max_pool(shape, k, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)       # no ties
    y_ref, _ = _pool_and_grad(lambda a: tf.nn.max_pool2d(a, k, k, padding), x, 0.0)
    g = rng.normal(size=y_ref.shape).astype(np.float32)
    y_ref, dx_ref = _pool_and_grad(lambda a: tf.nn.max_pool2d(a, k, k, padding), x, g)
    y, dx = _pool_and_grad(lambda a: ops.max_pool2d(a, k, padding), x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_allclose(dx, _np_first_max_grad(x, g, k, padding), atol=1e-6)


@pytest.mark.parametrize("shape,k,padding", CASES)
def test_ties_go_to_the_first_maximum_like_max_pool_grad(shape, k, padding):
    rng = np.random.default_rng(1)
    x = rng.integers(-1, 2, size=shape).astype(np.float32)   # many ties, e.g. all-equal windows
    y, _ = _pool_and_grad(lambda a: ops.max_pool2d(a, k, padding), x, 0.0)
    g = rng.normal(size=y.shape).astype(np.float32)
    expected = _np_first_max_grad(x, g, k, padding)
    for graph in (False, True):
        _, dx = _pool_and_grad(lambda a: ops.max_pool2d(a, k, padding), x, g, graph)
        np.testing.assert_allclose(dx, expected, atol=1e-6)
        _, dx_tf = _pool_and_grad(lambda a: tf.nn.max_pool2d(a, k, k, padding), x, g, graph)
        np.testing.assert_allclose(dx_tf, expected, atol=1e-6)   # TF's MaxPoolGrad does the same
    # one gradient per output: each window's mass goes to exactly one element
    assert np.count_nonzero(dx) <= y.size


def test_backward_lowers_to_builtins_without_max_pool_grad():
    pool = lambda a: ops.max_pool2d(a, 2, "SAME")  # noqa: E731

    @tf.function(input_signature=[tf.TensorSpec((2, 5, 6, 3))])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(pool(x) ** 2)
        return tape.gradient(loss, x)

    graph = step.get_concrete_function().graph
    names = {op.type for op in graph.get_operations()}
    for fn in graph._functions.values():
        names |= {n.op for n in fn.definition.node_def}
    assert "MaxPoolGrad" not in names and "MaxPool" in names
    converter = tf.lite.TFLiteConverter.from_concrete_functions([step.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    from ai_edge_litert.interpreter import Interpreter
    from keras_coherence.binary.export_lce import non_builtin_ops, tflite_ops

    flatbuffer = converter.convert()
    assert non_builtin_ops(flatbuffer) == []
    assert {"MAX_POOL_2D", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE"} <= set(tflite_ops(flatbuffer))
    x = np.random.default_rng(2).integers(-2, 3, size=(2, 5, 6, 3)).astype(np.float32)
    interp = Interpreter(model_content=flatbuffer)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    lite = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_allclose(lite, step(tf.constant(x)).numpy(), atol=1e-6)


def test_layer_config_errors_and_models():
    layer = bl.LowMemoryMaxPooling2D(3, padding="same", name="p")
    clone = bl.LowMemoryMaxPooling2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert keras.utils.get_registered_object("keras_coherence>LowMemoryMaxPooling2D") is bl.LowMemoryMaxPooling2D
    assert isinstance(layer, keras.layers.MaxPooling2D)       # memory_profile's max-pool rule
    with pytest.raises(ValueError, match="square pool"):
        bl.LowMemoryMaxPooling2D((2, 3))
    with pytest.raises(ValueError, match="strides equal to pool_size"):
        bl.LowMemoryMaxPooling2D(3, strides=2)
    with pytest.raises(ValueError, match="channels_last"):
        bl.LowMemoryMaxPooling2D(2, data_format="channels_first")
    with pytest.raises(ValueError, match="at least 3x3"):
        ops.max_pool2d(tf.zeros((1, 2, 5, 1)), 3)
    with pytest.raises(ValueError, match="static H, W, C"):
        ops.max_pool2d(tf.zeros((4, 4)), 2)
    with pytest.raises(ValueError, match=r"in \[2, 15\]"):
        bl.LowMemoryMaxPooling2D(1)(tf.zeros((1, 4, 4, 1)))
    for builder in (bm.cnv, bm.binarynet):
        low, std = builder(method="low_memory"), builder(method="standard")
        low_pools = [l for l in low.layers if isinstance(l, keras.layers.MaxPooling2D)]
        assert low_pools and all(type(l) is bl.LowMemoryMaxPooling2D for l in low_pools)
        assert all(type(l) is keras.layers.MaxPooling2D
                   for l in std.layers if isinstance(l, keras.layers.MaxPooling2D))
        assert [l.name for l in low.layers] == [l.name for l in std.layers]
