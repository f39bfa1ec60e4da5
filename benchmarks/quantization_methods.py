"""PO2 weight quantization methods compared on MobileNetV1 / V2 (issue 4's table).

For each model (small width, 32x32x3 input: the embedded MNIST zero-padded, or a
tfds dataset such as cifar10 with ``--dataset``): train in float once (Adam), then,
from the same float weights, run quantization-aware training (4-bit weights,
8-bit activations, BN folded) with each method and export an integer TFLite model:

* ``tfmot8``         -- tfmot's default 8-bit QAT (float per-channel scales; reference);
* ``msqe_baseline``  -- ``MSQEPo2Baseline`` (QKeras ``quantized_bits(4, 0, 1, alpha="auto_po2")``);
* ``msqe+fixes``     -- ``MSQEPo2``: outlier mask, gradient-second-moment weights, LS +
  line search, and the stable exponent (EMA, switched on for the last QAT epoch);
* ``learned``        -- ``LearnedPo2`` TQT-style: trainable log2 scale, 3-sigma init, ceil;
* ``learned+fixes``  -- ``LearnedPo2`` with MSQE rounding and LSQ gradient scaling.

The table: test accuracy of the float model, of the quantized Keras model and of the
TFLite model in LiteRT (their top-1 agreement, and the 99th percentile of
``|Keras - LiteRT|`` logits in output int8 steps), the mean exponent flip rate per
step (``ScaleMonitor``: flipped exponents / all exponents, averaged over steps), the
final clip fraction, the median QAT step time (ms) and whether every exported scale is
an exact power of two. Each method's QAT is one run with one seed: differences of a
point or two are within run-to-run noise at this size.

    .venv/bin/python benchmarks/quantization_methods.py [--models mobilenet_v1,mobilenet_v2]
        [--float-epochs 8] [--qat-epochs 3] [--methods ...] [--dataset cifar10] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the package itself, when not pip-installed
    sys.path.insert(0, _ROOT)

METHODS = {
    "tfmot8": dict(method="tfmot8", bits=8),
    "msqe_baseline": dict(method="msqe_baseline"),
    "msqe+fixes": dict(method="msqe", quantizer_options={"stable_exponent": True}, stable_switch=True),
    "learned": dict(method="learned", quantizer_options={"rounding": "ceil", "use_second_moments": False}),
    "learned+fixes": dict(method="learned", quantizer_options={"rounding": "msqe", "lsq_grad_scale": True}),
}
ALPHA = {"mobilenet_v1": 0.25, "mobilenet_v2": 0.35}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenet_v1,mobilenet_v2")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--dataset", default="embedded_mnist", help="embedded_mnist (offline) or a prepared tfds name")
    p.add_argument("--train-size", type=int, default=None, help="keep this many training images")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--float-epochs", type=int, default=8)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the float training")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate of QAT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "quantization_methods"))
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import numpy as np

    from keras_coherence import data, models
    from keras_coherence._keras import keras, tf
    from keras_coherence.quantization.evaluate import qat_evaluate

    (x_train, y_train), (x_test, y_test) = data.load_dataset(args.dataset)
    if args.train_size:
        x_train, y_train = x_train[:args.train_size], y_train[:args.train_size]
    x_train, x_test = models.pad_images(x_train), models.pad_images(x_test)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    os.makedirs(args.out, exist_ok=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    print(f"quantization methods: TF {tf.__version__}, Python {platform.python_version()}, {args.dataset} "
          f"{len(x_train)} train / {len(x_test)} test at {x_train.shape[1:]}, {args.bits}-bit weights, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in args.models.split(","):
        keras.utils.set_random_seed(args.seed)
        model = models.build_model(name, x_train.shape[1:], num_classes, alpha=ALPHA.get(name, 0.35))
        for layer in model.layers:  # Keras's 0.999 leaves small-data runs near chance (measured.md)
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        model.compile(keras.optimizers.Adam(args.lr), loss, metrics=["accuracy"])
        t0 = time.perf_counter()
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.float_epochs, verbose=0)
        _, float_acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
        print(f"[{name}] {model.count_params():,} parameters; float {args.float_epochs} epochs "
              f"{time.perf_counter() - t0:.0f} s: test accuracy {float_acc:.4f}", flush=True)
        for label in args.methods.split(","):
            spec = dict(METHODS[label])
            stable_switch = spec.pop("stable_switch", False)
            bits = spec.pop("bits", args.bits)
            keras.utils.set_random_seed(args.seed + 1)
            t0 = time.perf_counter()
            result = qat_evaluate(
                model, (x_train, y_train), (x_test, y_test), bits=bits, qat_epochs=args.qat_epochs,
                optimizer=keras.optimizers.Adam(args.qat_lr), batch_size=args.batch_size,
                stable_switch_epoch=(args.qat_epochs - 1 if stable_switch and args.qat_epochs > 1 else None),
                **spec)
            acc, scales, info = result["accuracy"], result["scales"], result["tflite_info"]
            row = {"model": name, "method": label, "bits": bits, "float": float(float_acc),
                   "keras": acc["quantized_keras"], "tflite": acc["tflite"],
                   "agreement": acc["keras_tflite_agreement"],
                   "logit_steps_p99": (result["logit_steps"] or {}).get("p99"),
                   "logits_within_1_step": (result["logit_steps"] or {}).get("within_1"),
                   "litert_agreement": (result["litert_rounding"] or {}).get("agreement"),
                   "litert_logit_steps_max": ((result["litert_rounding"] or {}).get("logit_steps") or {}).get("max"),
                   "flip_rate": scales["mean_flip_rate"] if scales else None,
                   "clip_fraction": scales["final"]["clip_fraction"] if scales else None,
                   "step_ms": result["step_ms"], "all_scales_po2": info["all_scales_po2"],
                   "po2_tensors": f"{info['po2_tensors']}/{info['weight_tensors']}", "tflite_bytes": info["bytes"],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"[{name}] {label}: Keras {row['keras']:.4f}, TFLite {row['tflite']:.4f} (agreement "
                  f"{row['agreement']:.4f}; with LiteRT rounding {row['litert_agreement']}), "
                  f"flip rate {row['flip_rate']}, clip {row['clip_fraction']}, "
                  f"step {row['step_ms']:.1f} ms, PO2 scales {row['po2_tensors']}, {row['seconds']:.0f} s",
                  flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=2)
            del result
            keras.backend.clear_session()

    fmt = lambda v, p="{:.4f}": "–" if v is None else p.format(v)  # noqa: E731
    print("\n| model | method | float | Keras | TFLite | Keras↔TFLite | logit p99 (steps) "
          "| Keras (LiteRT rounding)↔TFLite | its max logit steps | flip rate / step | clip | step ms | PO2 scales |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['float']:.4f} | {r['keras']:.4f} | {r['tflite']:.4f} | "
              f"{r['agreement']:.4f} | {fmt(r['logit_steps_p99'], '{:.1f}')} | {fmt(r['litert_agreement'])} | "
              f"{fmt(r['litert_logit_steps_max'], '{:.1f}')} | {fmt(r['flip_rate'], '{:.2e}')} | "
              f"{fmt(r['clip_fraction'], '{:.3f}')} | "
              f"{r['step_ms']:.1f} | {r['po2_tensors']} |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; results in {os.path.join(args.out, 'results.json')}")
    return np.int64(0)


if __name__ == "__main__":
    sys.exit(int(main()))
