"""Why LiteRT's outputs and the Keras fake-quant outputs of a PO2 QAT model differ.

Trains a small MobileNetV1 (alpha 0.25, 32x32x3 padded embedded MNIST) briefly in
float, runs one QAT epoch with 4-bit PO2 weights (``msqe_baseline``), exports it with
``to_tflite`` and runs LiteRT keeping every intermediate tensor. For every CONV_2D and
DEPTHWISE_CONV_2D op it takes the op's own int8 input, int8 weights and int32 bias out
of the interpreter and recomputes the int8 output two ways:

* ``exact``: ``round((acc + bias) * M)`` with ``M = s_in * s_w / s_out`` in float64 --
  one rounding, what the Keras fake-quant graph computes;
* ``double``: TFLite's fixed-point requantization (``QuantizeMultiplier`` into a Q31
  multiplier and a shift, ``SaturatingRoundingDoublingHighMul`` then
  ``RoundingDivideByPOT``): two roundings.

It prints, per op, the fraction of LiteRT outputs that equal each. With PO2 weight
scales and neighbouring activation scales that are nearly equal, ``M`` is close to a
power of two, ``acc * M0`` lands near half-integers and the first rounding goes up
for about half the accumulators: LiteRT's output is then one step above the
single-rounded value for a few percent of the elements of every layer, and the
differences add up through the network. ``keras_coherence.quantization.litert``
holds the two functions used here and ``litert_rounding(model)``, which makes the
Keras model's inference round the same way.

    .venv/bin/python benchmarks/litert_rounding.py [--float-epochs 3] [--train 1000]
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float-epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="test images pushed through LiteRT")
    args = p.parse_args(argv)

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from keras_coherence import data, models
    from keras_coherence._keras import keras, tf
    from keras_coherence.quantization import quantize_model
    from keras_coherence.quantization.export import to_tflite
    from keras_coherence.quantization.litert import quantize_multiplier, requantize

    (x, y), (xt, _) = data.load_dataset("embedded_mnist")
    x, y, xt = models.pad_images(x[:args.train]), y[:args.train], models.pad_images(xt[:args.batch])
    keras.utils.set_random_seed(0)
    model = models.mobilenet_v1((32, 32, 3), 10, alpha=0.25)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, y, batch_size=64, epochs=args.float_epochs, verbose=0)
    qat = quantize_model(model, bits=4, method="msqe_baseline", calibration_data=x[:256])
    qat.compile(keras.optimizers.Adam(1e-4), loss)
    qat.fit(x, y, batch_size=64, epochs=1, verbose=0)
    tflite_model = to_tflite(qat)

    interp = Interpreter(model_content=tflite_model, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], xt.shape)
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], xt)
    interp.invoke()
    det = {d["index"]: d for d in interp.get_tensor_details()}
    keras_layers = {layer.name: layer for layer in qat.layers}

    def qparams(index):
        qp = det[index]["quantization_parameters"]
        return np.asarray(qp["scales"], np.float64), np.asarray(qp["zero_points"], np.int64)

    print(f"{'op':18s} {'layer':18s} {'outputs':>8s} {'= exact':>8s} {'= double':>9s}  shifts")
    totals = np.zeros(3)
    for op in interp._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        i_in, i_w, i_b, i_out = (int(i) for i in (*op["inputs"][:3], op["outputs"][0]))
        names = [n for n in keras_layers if f"/{n}/" in det[i_w]["name"] or f"/{n};" in det[i_w]["name"]]
        layer = keras_layers[max(names, key=len)].layer
        (s_in, z_in), (s_w, _), (s_out, z_out) = qparams(i_in), qparams(i_w), qparams(i_out)
        xq = interp.get_tensor(i_in).astype(np.float64) - z_in[0]
        w = interp.get_tensor(i_w).astype(np.float64)
        bias = interp.get_tensor(i_b).astype(np.int64)
        strides = (1, *layer.strides, 1)
        lite = interp.get_tensor(i_out).astype(np.int64)
        for padding in (layer.padding.upper(), "SAME"):  # the converter folds ZeroPadding2D into SAME
            if op["op_name"] == "CONV_2D":  # TFLite OHWI -> HWIO
                acc = tf.nn.conv2d(xq, np.transpose(w, (1, 2, 3, 0)), strides, padding).numpy()
            else:  # TFLite [1, H, W, C*M] -> [H, W, C, M]
                k = w[0].reshape(w.shape[1], w.shape[2], xq.shape[-1], -1)
                acc = tf.nn.depthwise_conv2d(xq, k, strides, padding).numpy()
            if acc.shape == lite.shape:
                break
        acc = np.round(acc).astype(np.int64) + bias
        # The fused activation's clamp (the output tensor is named after the ReLU6 layer).
        relu = "relu" in det[i_out]["name"].lower()
        act_min = int(z_out[0]) if relu else -128
        hi = min(127, int(z_out[0] + np.round(6.0 / s_out[0]))) if relu else 127
        m = s_in[0] * np.broadcast_to(s_w, (acc.shape[-1],)) / s_out[0]
        exact = np.clip(np.floor(acc * m + 0.5) + z_out[0], act_min, hi)  # half up, as fake-quant
        double = requantize(acc, m)
        double = np.clip(double + z_out[0], act_min, hi)
        n, e, d = lite.size, np.sum(lite == exact), np.sum(lite == double)
        totals += (n, e, d)
        shifts = sorted(set(quantize_multiplier(m)[1].tolist()))
        print(f"{op['op_name']:18s} {layer.name[:18]:18s} {n:8d} {e / n:8.2%} {d / n:9.2%}  {shifts}")
    n, e, d = totals
    print(f"\nall {int(n)} conv outputs: LiteRT equals single rounding for {e / n:.2%}, "
          f"TFLite double rounding for {d / n:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
