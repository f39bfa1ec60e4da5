"""PO2 weight quantization methods compared on MobileNetV1 / V2 (issue 4's table).

For each model (small width, 32x32x3 input: the embedded MNIST zero-padded, or a
tfds dataset such as cifar10 with ``--dataset``) and each seed: train in float (Adam),
then, from the same float weights, run quantization-aware training (4-bit weights,
8-bit activations, BN folded) with each method and export an integer TFLite model:

* ``float+ft``       -- the control: the float model fine-tuned with the QAT schedule
  (same optimizer, learning rate, epochs and batch size, no quantization), so a QAT
  gain over the float column can be told from the gain of simply training longer;
* ``tfmot8``         -- tfmot's default 8-bit QAT (float per-channel scales; reference);
* ``msqe_baseline``  -- ``MSQEPo2Baseline`` (QKeras ``quantized_bits(4, 0, 1, alpha="auto_po2")``);
* ``msqe+fixes``     -- ``MSQEPo2``: outlier mask, gradient-second-moment weights, LS +
  line search, and the stable exponent (EMA, switched on for the last QAT epoch);
* ``learned``        -- ``LearnedPo2`` TQT-style: trainable log2 scale, 3-sigma init, ceil;
* ``learned+fixes``  -- ``LearnedPo2`` with MSQE rounding and LSQ gradient scaling.

Each seed in ``--seeds`` sets the float model's initial weights, the float training's
data order and the fine-tuning / QAT runs (initialisation, data order); the train/test
split of the data set is the same for every seed. Per (model, method) the table gives
the mean ± sample standard deviation (ddof=1) over the seeds of: test accuracy of the
float model, of the quantized Keras model and of the TFLite model in LiteRT, their
top-1 agreement, the 99th percentile of ``|Keras - LiteRT|`` logits in output int8
steps; the worst case over seeds of the ``litert_rounding`` parity (lowest top-1
agreement, largest logit difference in steps); and, averaged over seeds, the mean
exponent flip rate per step (``ScaleMonitor``), the final clip fraction and the median
QAT step time (ms); and whether every exported scale is an exact power of two. A second table gives each method's
paired difference to the ``float+ft`` control of the same seed (Keras accuracy
minus control accuracy), mean ± std and min..max over the seeds.

Written to ``--out``: ``results.json`` (arguments, every per-seed row, the summary),
``results.csv`` (one row per model, seed and method) and ``table.md`` (both tables).

    .venv/bin/python benchmarks/quantization_methods.py [--models mobilenet_v1,mobilenet_v2]
        [--float-epochs 8] [--qat-epochs 3] [--methods ...] [--seeds 0,1,2]
        [--dataset cifar10] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the package itself, when not pip-installed
    sys.path.insert(0, _ROOT)

FLOAT_CONTROL = "float+ft"
# In priority order: a run stopped early has the first ones for every seed.
METHODS = {
    FLOAT_CONTROL: dict(method=None),
    "msqe_baseline": dict(method="msqe_baseline"),
    "msqe+fixes": dict(method="msqe", quantizer_options={"stable_exponent": True}, stable_switch=True),
    "learned+fixes": dict(method="learned", quantizer_options={"rounding": "msqe", "lsq_grad_scale": True}),
    "learned": dict(method="learned", quantizer_options={"rounding": "ceil", "use_second_moments": False}),
    "tfmot8": dict(method="tfmot8", bits=8),
}
ALPHA = {"mobilenet_v1": 0.25, "mobilenet_v2": 0.35}
# Per-seed accuracy-like columns summarised as mean ± std; the rest are averaged.
SPREAD_KEYS = ("float", "keras", "tflite", "agreement", "logit_steps_p99")
MEAN_KEYS = ("litert_agreement", "litert_logit_steps_max", "flip_rate", "clip_fraction", "step_ms")
CSV_KEYS = ("model", "seed", "method", "bits", "float", "keras", "tflite", "agreement", "logit_steps_p99",
            "logits_within_1_step", "litert_agreement", "litert_logit_steps_max", "flip_rate", "clip_fraction",
            "step_ms", "all_scales_po2", "po2_tensors", "tflite_bytes", "seconds")


def parse_seeds(text: str):
    """``"0,1,2"`` -> ``[0, 1, 2]``; a clear error for anything else."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip() != ""]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2; got {text!r}.") from None
    if not seeds:
        raise ValueError(f"--seeds must name at least one integer seed, e.g. --seeds 0; got {text!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed ({text!r}): a repeated seed is not an independent run; "
                         "list each seed once.")
    if min(seeds) < 0:
        raise ValueError(f"--seeds must be non-negative integers (Keras seeds are unsigned); got {text!r}.")
    return seeds


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
    p.add_argument("--qat-lr", type=float, default=1e-4,
                   help="Adam learning rate of QAT and of the float+ft control")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one full run each (e.g. 0,1,2)")
    p.add_argument("--out", default=os.path.join("runs", "quantization_methods"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    try:
        args.seed_list = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    for name in ("float_epochs", "qat_epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}.")
    return args


def _stats(values):
    """mean, sample std (ddof=1; None for one value), min, max, n of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n}


def summarize(rows):
    """Per (model, method), in first-seen order: the seeds, ``_stats`` of every
    ``SPREAD_KEYS`` / ``MEAN_KEYS`` column, whether every seed exported only PO2 scales,
    and ``vs_control``: ``_stats`` of the per-seed Keras accuracy minus the
    ``float+ft`` control's of the same model and seed (None without a control)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"]), []).append(r)
    control = {(r["model"], r["seed"]): r["keras"] for r in rows if r["method"] == FLOAT_CONTROL}
    out = []
    for (model, method), rs in groups.items():
        entry = {"model": model, "method": method, "seeds": [r["seed"] for r in rs]}
        for k in SPREAD_KEYS + MEAN_KEYS:
            entry[k] = _stats([r.get(k) for r in rs])
        entry["all_scales_po2"] = all(r.get("all_scales_po2") for r in rs)
        entry["po2_tensors"] = sorted({r.get("po2_tensors") for r in rs if r.get("po2_tensors")})
        diffs = [r["keras"] - control[(model, r["seed"])] for r in rs
                 if method != FLOAT_CONTROL and (model, r["seed"]) in control]
        entry["vs_control"] = _stats(diffs)
        out.append(entry)
    return out


def _pm(s, p="{:.3f}"):
    if s is None:
        return "–"
    return p.format(s["mean"]) if s["std"] is None else f"{p.format(s['mean'])} ± {p.format(s['std'])}"


def format_tables(summary):
    """The two Markdown tables (methods; paired difference to the control)."""
    mean = lambda s, p: "–" if s is None else p.format(s["mean"])  # noqa: E731
    lines = ["| model | method | seeds | float | Keras | TFLite | Keras↔TFLite top-1 | logit p99 (steps) "
             "| with `litert_rounding`: lowest top-1 (largest logit steps) | flip rate / step | clip fraction "
             "| step ms | exact PO2 scales |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        # The parity column is a worst case over seeds, not a mean: one seed off is a finding.
        litert = ("–" if e["litert_agreement"] is None else
                  f"{e['litert_agreement']['min']:.3f} ({e['litert_logit_steps_max']['max']:.0f})")
        lines.append(
            f"| {e['model']} | {e['method']} | {len(e['seeds'])} | {_pm(e['float'])} | {_pm(e['keras'])} | "
            f"{_pm(e['tflite'])} | {_pm(e['agreement'])} | {_pm(e['logit_steps_p99'], '{:.1f}')} | {litert} | "
            f"{mean(e['flip_rate'], '{:.1e}')} | {mean(e['clip_fraction'], '{:.3f}')} | "
            f"{mean(e['step_ms'], '{:.1f}')} | {', '.join(e['po2_tensors']) or '–'} |")
    lines += ["", f"| model | method | Keras − {FLOAT_CONTROL} (same seed), mean ± std | min .. max | seeds |",
              "|---|---|---|---|---|"]
    for e in summary:
        d = e["vs_control"]
        if d is None:
            continue
        std = "" if d["std"] is None else f" ± {100 * d['std']:.1f}"
        lines.append(f"| {e['model']} | {e['method']} | {100 * d['mean']:+.1f}{std} points | "
                     f"{100 * d['min']:+.1f} .. {100 * d['max']:+.1f} | {d['n']} |")
    return "\n".join(lines)


def _float_control(float_model, train, test, epochs, optimizer, batch_size):
    """The float model (a copy) fine-tuned with the QAT schedule: test accuracy and step time."""
    import numpy as np

    from keras_coherence import keras
    from keras_coherence.quantization.evaluate import StepTimer

    model = keras.models.clone_model(float_model)
    model.set_weights(float_model.get_weights())
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    timer = StepTimer()
    model.fit(*train, batch_size=batch_size, epochs=epochs, shuffle=True, callbacks=[timer], verbose=0)
    pred = model.predict(test[0], batch_size=1024, verbose=0).argmax(1)
    return float(np.mean(pred == test[1])), timer.median_ms()


def _write(out, args, rows):
    summary = summarize(rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows, "summary": summary}, f, indent=2)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = format_tables(summary)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv=None):
    args = parse_args(argv)

    from keras_coherence import data, models
    from keras_coherence import keras, tf
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
          f"seeds {args.seed_list}, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in args.models.split(","):
        # Every seed's float model first, then the methods one by one over all seeds: a
        # run stopped early leaves whole methods (every seed), in --methods order.
        float_models = {}
        for seed in args.seed_list:
            # The seed sets the initial weights and the data order of the float training ...
            keras.utils.set_random_seed(seed)
            model = models.build_float_model(name, x_train.shape[1:], num_classes, alpha=ALPHA.get(name, 0.35))
            for layer in model.layers:  # Keras's 0.999 leaves small-data runs near chance
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = 0.9
            model.compile(keras.optimizers.Adam(args.lr), loss, metrics=["accuracy"])
            t0 = time.perf_counter()
            model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.float_epochs, verbose=0)
            _, float_acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
            float_models[seed] = (model, float(float_acc))
            print(f"[{name} seed {seed}] {model.count_params():,} parameters; float {args.float_epochs} epochs "
                  f"{time.perf_counter() - t0:.0f} s: test accuracy {float_acc:.4f}, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        for label in args.methods.split(","):
            for seed in args.seed_list:
                model, float_acc = float_models[seed]
                spec = dict(METHODS[label])
                stable_switch = spec.pop("stable_switch", False)
                bits = spec.pop("bits", args.bits)
                # ... and, offset so it differs from the float run's stream, every fine-tuning run.
                keras.utils.set_random_seed(seed + 1)
                t0 = time.perf_counter()
                row = {"model": name, "seed": seed, "method": label, "float": float_acc}
                if spec["method"] is None:
                    acc, step_ms = _float_control(model, (x_train, y_train), (x_test, y_test), args.qat_epochs,
                                                  keras.optimizers.Adam(args.qat_lr), args.batch_size)
                    row.update({"bits": 32, "keras": acc, "tflite": None, "agreement": None,
                                "logit_steps_p99": None, "logits_within_1_step": None, "litert_agreement": None,
                                "litert_logit_steps_max": None, "flip_rate": None, "clip_fraction": None,
                                "step_ms": step_ms, "all_scales_po2": None, "po2_tensors": None,
                                "tflite_bytes": None})
                else:
                    result = qat_evaluate(
                        model, (x_train, y_train), (x_test, y_test), bits=bits, qat_epochs=args.qat_epochs,
                        optimizer=keras.optimizers.Adam(args.qat_lr), batch_size=args.batch_size,
                        stable_switch_epoch=(args.qat_epochs - 1 if stable_switch and args.qat_epochs > 1
                                             else None),
                        **spec)
                    acc, scales, info = result["accuracy"], result["scales"], result["tflite_info"]
                    litert = result["litert_rounding"] or {}
                    row.update({
                        "bits": bits, "keras": acc["quantized_keras"], "tflite": acc["tflite"],
                        "agreement": acc["keras_tflite_agreement"],
                        "logit_steps_p99": (result["logit_steps"] or {}).get("p99"),
                        "logits_within_1_step": (result["logit_steps"] or {}).get("within_1"),
                        "litert_agreement": litert.get("agreement"),
                        "litert_logit_steps_max": (litert.get("logit_steps") or {}).get("max"),
                        "flip_rate": scales["mean_flip_rate"] if scales else None,
                        "clip_fraction": scales["final"]["clip_fraction"] if scales else None,
                        "step_ms": result["step_ms"], "all_scales_po2": info["all_scales_po2"],
                        "po2_tensors": f"{info['po2_tensors']}/{info['weight_tensors']}",
                        "tflite_bytes": info["bytes"]})
                    del result
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                fmt = lambda v, p="{:.4f}": "–" if v is None else p.format(v)  # noqa: E731
                print(f"[{name} seed {seed}] {label}: Keras {row['keras']:.4f}, TFLite {fmt(row['tflite'])} "
                      f"(agreement {fmt(row['agreement'])}; with LiteRT rounding {fmt(row['litert_agreement'])}), "
                      f"flip rate {row['flip_rate']}, clip {row['clip_fraction']}, "
                      f"step {row['step_ms']:.1f} ms, PO2 scales {row['po2_tensors']}, {row['seconds']:.0f} s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                _write(args.out, args, rows)  # after every cell: a killed run keeps what it measured
                keras.backend.clear_session()

    table = _write(args.out, args, rows)
    print("\nmean ± sample std (ddof=1) over seeds; flip rate, clip, step ms: mean over seeds\n")
    print(table)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; per-seed rows in "
          f"{os.path.join(args.out, 'results.csv')} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
