"""Packed storage with TFLite builtin ops only, round-tripped inside LiteRT.

The building blocks an on-device training graph needs to keep binary state at its
real width: 32 signs per int32 word, and float16 values as pairs inside an int32
resource variable. Both are converted with TFLITE_BUILTINS only (no Flex) and
checked bit for bit against numpy in the LiteRT interpreter.
"""
import numpy as np
import pytest

from keras_coherence._keras import tf

WORDS = 6  # 6 x 32 signs


def _pack_signs(bits):
    """``bits`` [..., 32] of 0/1 -> int32 words: sum of bit * 2^k, bit 31 weighing -2^31."""
    weights = tf.constant([1 << k for k in range(31)] + [-(1 << 31)], tf.int64)
    return tf.cast(tf.reduce_sum(tf.cast(bits, tf.int64) * weights, -1), tf.int32)


def _unpack_signs(words):
    """int32 words -> [..., 32] of 0/1 (arithmetic shift, then the lowest bit)."""
    shifts = tf.range(32, dtype=tf.int32)
    return tf.math.floormod(tf.bitwise.right_shift(words[..., None], shifts), 2)


class PackedState(tf.Module):
    def __init__(self):
        super().__init__()
        self.signs = tf.Variable(tf.zeros([WORDS], tf.int32))
        self.halves = tf.Variable(tf.zeros([WORDS * 16], tf.int32))  # 32 float16 per 16 words

    @tf.function(input_signature=[tf.TensorSpec([WORDS * 32], tf.float32),
                                  tf.TensorSpec([WORDS * 32], tf.float32)])
    def store(self, x, values):
        bits = tf.reshape(tf.cast(x >= 0, tf.int32), [WORDS, 32])
        self.signs.assign(_pack_signs(bits))
        pairs = tf.reshape(tf.cast(values, tf.float16), [WORDS * 16, 2])
        self.halves.assign(tf.bitcast(pairs, tf.int32))
        return {"words": self.signs.read_value()}

    @tf.function(input_signature=[])
    def load(self):
        signs = tf.reshape(_unpack_signs(self.signs), [WORDS * 32])
        values = tf.reshape(tf.bitcast(self.halves, tf.float16), [WORDS * 32])
        return {"signs": tf.cast(signs, tf.float32) * 2.0 - 1.0, "values": tf.cast(values, tf.float32)}


@pytest.fixture(scope="module")
def interpreter(tmp_path_factory):
    from ai_edge_litert.interpreter import Interpreter

    module = PackedState()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.store.get_concrete_function(), module.load.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex
    path = tmp_path_factory.mktemp("packed") / "packed.tflite"
    path.write_bytes(converter.convert())
    return Interpreter(model_path=str(path))


def test_signs_and_float16_pairs_round_trip_exactly_in_litert(interpreter):
    rng = np.random.default_rng(0)
    x = rng.normal(size=WORDS * 32).astype("float32")
    x[:32] = -1.0  # all signs negative: a word of zeros
    x[32:64] = 1.0  # all positive: all 32 bits set, bit 31 included, so the word is -1
    values = (rng.normal(size=WORDS * 32) * 100).astype("float32")
    runners = {s: interpreter.get_signature_runner(s) for s in interpreter.get_signature_list()}
    words = runners["store"](x=x, values=values)["words"]

    bits = (x.reshape(WORDS, 32) >= 0).astype(np.uint64)
    expected_words = (bits << np.arange(32, dtype=np.uint64)).sum(1).astype(np.uint32).view(np.int32)
    np.testing.assert_array_equal(words, expected_words)
    assert words[0] == 0 and words[1] == -1
    out = runners["load"]()
    np.testing.assert_array_equal(out["signs"], np.where(x >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(out["values"], values.astype(np.float16).astype(np.float32))


def test_only_builtin_ops(interpreter):
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(name.startswith("Flex") or name == "CUSTOM" for name in ops), ops
    assert {"RIGHT_SHIFT", "FLOOR_MOD", "BITCAST"} <= ops


@pytest.mark.parametrize("dtype, converts", [("float16", False), ("int16", False),
                                             ("int8", True), ("uint8", True), ("bool", True)])
def test_which_resource_variable_dtypes_convert_to_builtins(dtype, converts):
    """Why float16 state travels as int32 pairs: a float16 (or int16) resource variable
    does not legalize to builtins, while int8/uint8/bool ones do."""
    class Holder(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = tf.Variable(tf.zeros([4], dtype))

        @tf.function(input_signature=[tf.TensorSpec([4], tf.float32)])
        def step(self, x):
            self.v.assign(tf.cast(x, dtype))
            return {"out": tf.cast(self.v.read_value(), tf.float32)}

    holder = Holder()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([holder.step.get_concrete_function()], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if converts:
        assert len(converter.convert()) > 0
    else:
        with pytest.raises(Exception, match="VarHandleOp|not legalized|ConverterError|failed"):
            converter.convert()
