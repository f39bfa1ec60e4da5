"""What the on-device training graph stores: bit-packed words (ops.pack_bits / unpack_bits,
checked against numpy, in TensorFlow and in LiteRT), convolutions split over the batch
(checked against autodiff of larq's STE), and the saved tensors of a real export."""
import os
import sys

import numpy as np
import pytest

import keras_coherence as kc  # noqa: F401  (selects Keras 2 before larq / tf)
import larq as lq
from ai_edge_litert.interpreter import Interpreter
from keras_coherence._keras import keras, tf
from keras_coherence.binary import config as C
from keras_coherence.binary import export_training, ops
from keras_coherence.binary.models import mlp
from reference import tape_grads

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bnn_device_memory as bdm  # noqa: E402


def _np_pack(bits):
    """Words of :func:`ops.pack_bits` by hand: element ``32 j + i`` of an example is bit
    ``i`` of its word ``j`` (two's complement int32)."""
    flat = bits.reshape(len(bits), -1).astype(np.uint64)
    pad = -flat.shape[1] % 32
    flat = np.pad(flat, [(0, 0), (0, pad)]).reshape(len(bits), -1, 32)
    words = (flat << np.arange(32, dtype=np.uint64)).sum(-1)
    return words.astype(np.uint32).view(np.int32)


SHAPES = [(3, 5), (4, 2, 3, 7), (2, 64), (1, 33), (5, 4, 4, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [None, 64])
def test_pack_and_unpack_match_numpy(shape, budget):
    bits = np.random.default_rng(sum(shape)).random(shape) < 0.5
    bits.flat[0] = True  # bit 31 of a word set somewhere: the sign bit
    with ops.scratch_budget(budget):  # 64 bytes: one example per chunk
        words = ops.pack_bits(tf.constant(bits))
        back = ops.unpack_bits(words, shape)
    np.testing.assert_array_equal(words.numpy(), _np_pack(bits))
    np.testing.assert_array_equal(back.numpy(), bits)


def _litert(fn, spec):
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf.function(fn, input_signature=[spec]).get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()

    def run(value):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], value)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return run


def test_pack_and_unpack_in_litert_builtins_match_numpy():
    shape = (6, 3, 3, 40)  # 360 elements per example: 12 words, the last one padded
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    x[0, 0, 0, 31] = 1.0  # sign bit of a word
    pack = _litert(lambda t: ops.pack_bits(t >= 0), tf.TensorSpec(shape, tf.float32))
    words = pack(x)
    np.testing.assert_array_equal(words, _np_pack(x >= 0))
    unpack = _litert(lambda w: tf.cast(ops.unpack_bits(w, shape), tf.float32),
                     tf.TensorSpec(words.shape, tf.int32))
    np.testing.assert_array_equal(unpack(words), (x >= 0).astype(np.float32))


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "VALID"), (1, "VALID")])
@pytest.mark.parametrize("retention", [False, True])
def test_convolution_split_over_the_batch_equals_ste_autodiff(stride, padding, retention):
    """A scratch budget below one example's im2col: every example is its own chunk (5
    examples: forward, input and kernel gradient all split), against larq's SteSign."""
    cfg = C.LowMemoryConfig(binary_activation_retention=retention, l1_batchnorm=False,
                            binarize_weight_grads=False, activation_grad="float32",
                            latent_weights="float32")
    x = np.random.default_rng(0).normal(size=(5, 7, 7, 3)) * 1.5
    w = np.random.default_rng(1).normal(size=(3, 3, 3, 4)) * 0.9

    def ref(a, b):
        return tf.nn.conv2d(lq.quantizers.SteSign()(a), lq.quantizers.SteSign()(b), stride,
                            padding)

    assert len(ops.batch_chunks(5, 10**9)) == 1
    with ops.scratch_budget(1):
        assert len(ops.batch_chunks(5, 100)) == 5
        ours = tape_grads(lambda a, b: ops.binary_conv2d(a, b, stride, padding, cfg), x, w)[:3]
    for a, b in zip(ours, tape_grads(ref, x, w)[:3]):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_scratch_budget_validation():
    with pytest.raises(ValueError, match="positive number of bytes"):
        ops.scratch_budget(0)
    with pytest.raises(ValueError, match="positive number of bytes"):
        export_training.TrainingModule(mlp(hidden=(8,), method="low_memory"), scratch_bytes=-1)


def _saved(method, batch=32):
    keras.utils.set_random_seed(0)
    model = mlp(hidden=(64, 48), method=method)
    flatbuffer = export_training.to_training_tflite(export_training.TrainingModule(model, batch_size=batch))
    tensors, _ = bdm.tensor_breakdown(flatbuffer)
    return [t for t in tensors if t["kind"] == "saved_for_backward"]


@pytest.mark.device_export
def test_low_memory_export_saves_packed_words_not_activations():
    """What lives from the forward to the backward pass of the exported low-memory MLP:
    the real input of the first layer, per-channel statistics, and int32 words, one row of
    ceil(n / 32) per example for each binary layer's signs and STE mask and each l1 batch
    norm's signs (tests/test_binary_memory.py checks the standard_device export's float32
    activations against the device memory model)."""
    batch = 32
    saved = _saved("low_memory", batch)
    activations = sorted(t["shape"] for t in saved if t["dtype"] == "float32" and t["shape"][:1] == [batch])
    # the first layer's real input, and the loss's softmax and one-hot labels (logits-sized)
    assert activations == [[batch, 10], [batch, 10], [batch, 784]]
    words = sorted(tuple(t["shape"]) for t in saved if t["dtype"] == "int32" and t["shape"][:1] == [batch])
    # bn_fc_1 / bn_fc_2 / logits_bn signs; fc_2 and logits inputs: sign + mask
    expected = sorted([(batch, 2), (batch, 2), (batch, 1), (batch, 2), (batch, 2), (batch, 2),
                       (batch, 2)])
    assert words == expected
    assert max(t["bytes"] for t in saved if t["dtype"] == "float32" and t["shape"][:1] != [batch]) <= 4 * 784
