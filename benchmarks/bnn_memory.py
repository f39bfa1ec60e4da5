"""Real peak memory of binary-network training (process RSS) next to memory_profile.

Each (method, batch size) runs in its own subprocess: import, build, compile (RSS
"built"), two warm-up ``train_on_batch`` calls (tracing, optimizer slots, runtime
pools), then the peak-RSS mark is reset (``/proc/self/clear_refs``) and ``--steps`` more
steps run. Reported: the peak over all training above the built RSS, the peak of the
steady steps above the RSS after warm-up (what a step allocates beyond the pools the
allocator already holds), and
``memory_profile``'s modelled per-step part (saved activations + weight gradients +
largest gradient buffer) and its whole-model peak. Linux only.

    .venv/bin/python benchmarks/bnn_memory.py [--model mlp] [--batch-sizes 100,1000]
        [--methods standard,low_memory] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if os.path.dirname(_HERE) not in sys.path:  # the package itself, when not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))
import _timing  # noqa: E402

MIB = 2 ** 20


def _status_kib(field):
    from edge.runner import status_kib  # the /proc/self readings python -m edge uses

    return status_kib(field, required=True)


def child(model_name, method, batch_size, steps, optimizer):
    """Runs in the subprocess; prints one JSON line."""
    import numpy as np

    import keras_coherence as kc
    from keras_coherence.binary.models import build_binary_model
    from keras_coherence.binary.training import make_optimizer

    model = build_binary_model(model_name, method)
    model.compile(make_optimizer(optimizer),
                  kc.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch_size,) + model.input_shape[1:]).astype(np.float32)
    y = rng.integers(0, model.output_shape[-1], size=batch_size)
    rss_built = _status_kib("VmRSS")
    _reset_peak()
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    rss_warm, hwm_warm = _status_kib("VmRSS"), _status_kib("VmHWM")
    _reset_peak()
    for _ in range(steps):
        model.train_on_batch(x, y)
    print(json.dumps({"rss_built_kib": rss_built, "rss_warm_kib": rss_warm,
                      "hwm_warm_kib": hwm_warm, "hwm_kib": _status_kib("VmHWM")}))


def _reset_peak():
    from edge.runner import reset_peak_rss

    reset_peak_rss(required=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-sizes", default="100,1000")
    p.add_argument("--methods", default="standard,low_memory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "BATCH", "STEPS"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        method, batch, steps = args.child
        child(args.model, method, int(batch), int(steps), args.optimizer)
        return
    from keras_coherence.binary.memory import memory_profile

    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for method in args.methods.split(","):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--model", args.model,
                 "--optimizer", args.optimizer, "--child", method, str(batch),
                 str(args.steps)], capture_output=True, text=True, check=True)
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            t = memory_profile(args.model, batch, method, args.optimizer).totals()
            step_bits = t["saved_activations"] + t["weight_gradients"] + t["gradient_buffers"]
            built, warm = measured["rss_built_kib"] / 1024, measured["rss_warm_kib"] / 1024
            hwm = measured["hwm_kib"] / 1024
            whole = max(hwm, measured["hwm_warm_kib"] / 1024) - built
            rows.append((args.model, method, batch, f"{built:.1f}", f"{whole:.1f}",
                         f"{hwm - warm:.1f}", f"{step_bits / 8 / MIB:.2f}",
                         f"{t['peak'] / 8 / MIB:.2f}"))
            print(rows[-1], flush=True)
    print()
    print(_timing.markdown_table(
        ("model", "method", "batch", "RSS built MiB", "training peak - built MiB",
         "steady-step peak - warm RSS MiB", "modelled per-step MiB", "modelled peak MiB"), rows))


if __name__ == "__main__":
    main()
