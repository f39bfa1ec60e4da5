"""How LiteRT rounds a PO2 QAT model's integer ops, and whether Keras can predict it.

Trains a small MobileNetV2 (alpha 0.35, 32x32x3 padded embedded MNIST) briefly in
float, runs one QAT epoch with 4-bit PO2 weights (``msqe_baseline``), exports it with
``to_integer_tflite`` and runs LiteRT keeping every intermediate tensor, once with its
optimized builtin CPU kernels (what ``run_tflite`` uses) and once with the reference
kernels (``BUILTIN_REF``). For every CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD
and MEAN op it takes the op's own int8 inputs, weights and int32 bias out of the
interpreter, recomputes the int8 output with each candidate requantization and counts
the outputs equal to LiteRT's:

* ``float``: ``round(acc * M)`` with ``M = s_in * s_w / s_out`` in float64: one
  rounding, what the Keras fake-quant graph computes;
* ``double``: TFLite's ``MultiplyByQuantizedMultiplier``: a Q31 multiplier, a rounding
  doubling high multiply, then a rounding right shift whose ties go away from zero;
* ``double_half_up``: the same, the shift's ties going up;
* ``single``: ``(acc * q31 + half) >> (31 - shift)``.

Then the whole network: top-1 agreement and logit distance between Keras and LiteRT,
plain fake-quant and under ``litert_rounding`` for each kernel set, and how often the
interpreter's default XNNPACK delegate gives another top-1 than the builtin kernels.

    .venv/bin/python benchmarks/litert_rounding.py [--float-epochs 4] [--images 1000]
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

CANDIDATES = ("float", "double", "double_half_up", "single")
KERNEL_SETS = ("optimized", "reference")


def _int_ops(interp, ops, qat, tf):
    """``{op kind: [(int8 output as computed by LiteRT, {candidate: recomputed})]}`` over the
    file's ``ops`` (``tflite_operators``) that ``interp`` ran."""
    from keras_coherence.quantization.litert import multiply_by_quantized_multiplier, quantize_multiplier

    det = {d["index"]: d for d in interp.get_tensor_details()}
    layers = {layer.name: layer for layer in qat.layers}

    def qparams(index):
        qp = det[index]["quantization_parameters"]
        return np.asarray(qp["scales"], np.float64), np.asarray(qp["zero_points"], np.int64)

    def tensor(index):
        return interp.get_tensor(index).astype(np.int64)

    def requant(acc, q31, shift, candidate, m):
        if candidate == "float":
            return np.floor(acc * m + 0.5).astype(np.int64)
        return multiply_by_quantized_multiplier(acc, q31, shift, candidate)

    out = {}
    for op in ops:
        kind, ins, i_out = op.name, op.inputs, op.outputs[0]
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MEAN"):
            continue
        (s_out, z_out), lite = qparams(i_out), tensor(i_out)
        lo, hi = -128, 127
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            (s_in, z_in), (s_w, _) = qparams(ins[0]), qparams(ins[1])
            xq = (tensor(ins[0]) - z_in[0]).astype(np.float64)
            w = tensor(ins[1]).astype(np.float64)
            bias = tensor(ins[2]) if len(ins) > 2 and ins[2] >= 0 else 0
            if kind == "FULLY_CONNECTED":
                acc = xq.reshape(-1, w.shape[1]) @ w.T
            else:
                names = [n for n in layers if f"/{n}/" in det[ins[1]]["name"] or f"/{n};" in det[ins[1]]["name"]]
                layer = layers[max(names, key=len)].layer
                strides = (1, *layer.strides, 1)
                for padding in (layer.padding.upper(), "SAME"):  # the converter folds ZeroPadding2D into SAME
                    if kind == "CONV_2D":  # TFLite OHWI -> HWIO
                        acc = tf.nn.conv2d(xq, np.transpose(w, (1, 2, 3, 0)), strides, padding).numpy()
                    else:  # TFLite [1, H, W, C*M] -> [H, W, C, M]
                        k = w[0].reshape(w.shape[1], w.shape[2], xq.shape[-1], -1)
                        acc = tf.nn.depthwise_conv2d(xq, k, strides, padding).numpy()
                    if acc.shape == lite.shape:
                        break
            acc = np.round(acc).astype(np.int64).reshape(lite.shape) + bias
            # A fused ReLU / ReLU6 shows as the output tensor's name; its clamp.
            if "relu" in det[i_out]["name"].lower():
                lo = int(z_out[0])
                hi = min(127, int(z_out[0] + np.round(6.0 / s_out[0]))) if "relu6" in det[i_out]["name"].lower() \
                    else 127
            m = s_in[0] * np.broadcast_to(s_w, (acc.shape[-1],)) / s_out[0]
            q31, shift = quantize_multiplier(m)
            got = {c: requant(acc, q31, shift, c, m) for c in CANDIDATES}
        elif kind == "ADD":
            (s1, z1), (s2, z2) = qparams(ins[0]), qparams(ins[1])
            twice_max, left = 2.0 * max(s1[0], s2[0]), 1 << 20
            got = {}
            for c in CANDIDATES:
                if c == "float":
                    exact = ((tensor(ins[0]) - z1[0]) * s1[0] + (tensor(ins[1]) - z2[0]) * s2[0]) / s_out[0]
                    got[c] = np.floor(exact + 0.5).astype(np.int64)
                    continue
                scaled = [multiply_by_quantized_multiplier((tensor(i) - z[0]) * left,
                                                           *quantize_multiplier(s[0] / twice_max), c)
                          for i, s, z in ((ins[0], s1, z1), (ins[1], s2, z2))]
                got[c] = multiply_by_quantized_multiplier(scaled[0] + scaled[1],
                                                          *quantize_multiplier(twice_max / (left * s_out[0])), c)
        else:  # MEAN over height and width
            (s_in, z_in) = qparams(ins[0])
            x = tensor(ins[0])
            count = x.shape[1] * x.shape[2]
            total = (x - z_in[0]).sum(axis=(1, 2)).reshape(lite.shape)
            q31, shift = quantize_multiplier(s_in[0] / s_out[0])
            k = min(count.bit_length() - 1, 32, 31 + int(shift))
            got = {c: (np.floor(total * s_in[0] / (count * s_out[0]) + 0.5).astype(np.int64) if c == "float" else
                       multiply_by_quantized_multiplier(total, (int(q31) << k) // count, int(shift) - k, c))
                   for c in CANDIDATES}
        out.setdefault(kind, []).append((lite, {c: np.clip(v + z_out[0], lo, hi) for c, v in got.items()}))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float-epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=1000, help="test images pushed through LiteRT")
    args = p.parse_args(argv)

    from ai_edge_litert.interpreter import Interpreter

    from keras_coherence import data, models
    from keras_coherence import keras, tf
    from keras_coherence.quantization import quantize_model
    from keras_coherence.quantization.export import (
        litert_interpreter, run_tflite, tflite_operators, tflite_output_step, to_integer_tflite,
    )
    from keras_coherence.quantization.litert import litert_rounding

    (x, y), (xt, _) = data.load_dataset("embedded_mnist")
    x, xt = models.pad_images(x), models.pad_images(xt[:args.images])
    keras.utils.set_random_seed(0)
    model = models.build_float_model("mobilenet_v2", x.shape[1:], 10, alpha=0.35)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, y, batch_size=64, epochs=args.float_epochs, verbose=0)
    qat = quantize_model(model, bits=4, method="msqe_baseline", calibration_data=x[:256])
    qat.compile(keras.optimizers.Adam(1e-4), loss)
    qat.fit(x, y, batch_size=64, epochs=1, verbose=0)
    tflite_model = to_integer_tflite(qat)
    step = tflite_output_step(tflite_model)
    print(f"MobileNetV2 alpha 0.35, 4-bit PO2 weights (msqe_baseline), {len(xt)} test images")

    print("\nop by op: fraction of LiteRT's int8 outputs equal to each candidate requantization")
    print(f"{'kernels':10s} {'op':18s} {'ops':>4s} {'outputs':>9s} " + " ".join(f"{c:>15s}" for c in CANDIDATES))
    probe = xt[:100]  # every intermediate tensor is kept: a smaller batch
    for kernels in KERNEL_SETS:
        interp = litert_interpreter(tflite_model, kernels, preserve_all_tensors=True)
        inp = interp.get_input_details()[0]
        interp.resize_tensor_input(inp["index"], probe.shape)
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], probe)
        interp.invoke()
        for kind, ops in _int_ops(interp, tflite_operators(tflite_model), qat, tf).items():
            n = sum(lite.size for lite, _ in ops)
            equal = {c: sum(int(np.sum(lite == got[c])) for lite, got in ops) / n for c in CANDIDATES}
            print(f"{kernels:10s} {kind:18s} {len(ops):4d} {n:9d} " + " ".join(f"{equal[c]:15.4%}" for c in CANDIDATES))

    print("\nwhole network: Keras vs LiteRT on the test images")
    plain = qat.predict(xt, batch_size=500, verbose=0)
    for kernels in KERNEL_SETS:
        lite = run_tflite(tflite_model, xt, kernels=kernels)
        with litert_rounding(qat, kernels=kernels) as report:
            emulated = qat.predict(xt, batch_size=500, verbose=0)
        for label, keras_out in (("fake-quant", plain), ("litert_rounding", emulated)):
            steps = np.abs(keras_out - lite) / step
            print(f"  {kernels:9s} kernels, Keras {label:15s}: top-1 agreement "
                  f"{np.mean(keras_out.argmax(1) == lite.argmax(1)):.2%}, logits equal {np.mean(steps < 0.5):.2%}, "
                  f"max {steps.max():.0f} steps")
        if report["skipped"]:
            print(f"  (not emulated: {report['skipped']})")
    xnn = Interpreter(model_content=tflite_model)  # the default: builtin kernels + XNNPACK
    inp, out = xnn.get_input_details()[0], xnn.get_output_details()[0]
    xnn.resize_tensor_input(inp["index"], xt.shape)
    xnn.allocate_tensors()
    xnn.set_tensor(inp["index"], xt)
    xnn.invoke()
    xnn_logits = xnn.get_tensor(out["index"])
    optimized = run_tflite(tflite_model, xt)
    print(f"  the default interpreter (XNNPACK delegate) vs the builtin optimized kernels: top-1 agreement "
          f"{np.mean(xnn_logits.argmax(1) == optimized.argmax(1)):.2%}, logits equal "
          f"{np.mean(np.abs(xnn_logits - optimized) / step < 0.5):.2%}; vs Keras fake-quant "
          f"{np.mean(xnn_logits.argmax(1) == plain.argmax(1)):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
