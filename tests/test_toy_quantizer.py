"""A new PO2 quantizer is one class in one file: this toy, defined and registered here
in the test folder, quantizes through its alias, quantize_model + compile/fit (with
save/load) and the command line, without any change to the library."""
import json

import numpy as np

import keras_coherence  # noqa: F401  (first: selects Keras 2)
from keras_coherence import cli, keras, tf
from keras_coherence.quantization import quantizers
from keras_coherence.quantization.base import PO2Quantizer


@quantizers.register("max_abs_po2", "toy_max")
class MaxAbsPo2(PO2Quantizer):
    """The smallest power-of-two scale that clips nothing: ``e = ceil(log2(max|x| / qp))``."""

    def _calibrated_exponent(self, x, state):
        top = tf.reduce_max(tf.abs(x), axis=self.reduce_axes(x.shape), keepdims=True)
        return tf.math.ceil(tf.math.log(tf.maximum(top, 1e-30) / self.qp) / tf.math.log(2.0))

    def _quantize(self, x, training, state):
        e = tf.cond(self._flag(state["frozen"]), lambda: tf.convert_to_tensor(state["exponent"]),
                    lambda: self._calibrated_exponent(x, state))
        if training:
            self._store(state, e)
        scale = tf.pow(2.0, e)
        q = tf.clip_by_value(tf.round(x / scale), -self.qp, self.qp) * scale
        return x + tf.stop_gradient(q - x), tf.ones_like(x)


def test_alias_and_numbers_against_numpy():
    q = quantizers.get("max_abs_po2")
    assert isinstance(q, MaxAbsPo2) and isinstance(quantizers.get("MaxAbsPo2"), MaxAbsPo2)
    x = np.array([0.3, -1.7, 0.05, 0.9], "float32")
    y = q(tf.constant(x), training=True).numpy()
    e = np.ceil(np.log2(np.abs(x).max() / q.qp))  # 4 bits: qp = 7
    np.testing.assert_array_equal(y, np.clip(np.round(x / 2.0 ** e), -7, 7) * 2.0 ** e)
    assert int(q.exponent().numpy().ravel()[0]) == int(e)


def test_quantize_model_trains_saves_and_loads(tmp_path):
    from keras_coherence.quantization import qat

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.layers.Dense(8, activation="relu", input_shape=(6,)), keras.layers.Dense(3)])
    model = qat.quantize_model(base, bits=4, method="toy_max")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    qat.freeze_quantizers(model, recalibrate=True)  # exponents of the trained weights
    kernels = qat.quantized_kernels(model)
    assert kernels and all(isinstance(k.quantizer.quantizer, MaxAbsPo2) for k in kernels)
    for k in kernels:  # the stored exponent is the toy's: the smallest that clips no weight
        po2 = k.quantizer.quantizer
        w = k.weight.numpy()
        e = float(np.max(po2.exponent(k.state).numpy()))
        assert np.abs(w).max() <= po2.qp * 2.0 ** e and np.abs(w).max() > po2.qp * 2.0 ** (e - 1)
    path = str(tmp_path / "toy.keras")
    model.save(path)
    loaded = qat.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def test_toy_through_the_command_line(tmp_path):
    out = tmp_path / "q"
    argv = ["quantize", "--model", "mlp", "--hidden", "8", "--max-train", "128", "--batch-size", "64",
            "--float-epochs", "1", "--qat-epochs", "1", "--quiet", "--method", "toy_max", "--out", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantization"]["method"] == "toy_max" and summary["tflite"]["all_scales_po2"]
