"""Training-step time of a binary network in LiteRT against the same model in Keras,
interleaved in one process (paired rounds, so the load of a shared machine cancels).

For each method the training model is exported with ``TrainingModule(model,
batch_size=B)`` + ``to_training_tflite`` (or read from ``--keep-files`` with ``--reuse``, e.g. the
files ``bnn_device_memory.py --keep-files`` wrote) and opened as ``python -m edge train``
opens it (builtin kernels, no XNNPACK) with ``--threads`` interpreter threads; the Keras
model is the same build, Adam from logits, ``train_on_batch`` on the same batch, with
``--keras-threads`` TensorFlow threads. Every round runs one LiteRT step and one Keras
step per method, in a rotating order; the figure is the median of the per-round ratios.
Both sides keep training (each round changes the weights), as a real run would.
(``bnn_device_memory.py`` measures memory in a TensorFlow-free process; this one is for
time only.)

    nice -n 19 .venv/bin/python benchmarks/bnn_device_step.py [--model cnv] [--batch 100] \\
        [--methods low_memory,standard_device] [--rounds 5] [--threads 1] [--keras-threads 0] \\
        [--keep-files DIR [--reuse]]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

from _timing import Method, interleaved, summarize  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnv", help="mlp, cnv or binarynet")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--methods", default="low_memory,standard_device")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    p.add_argument("--keras-threads", type=int, default=0,
                   help="TensorFlow's intra- and inter-op threads (0: its choice)")
    p.add_argument("--keep-files", help="read/write the .tflite files here")
    p.add_argument("--reuse", action="store_true", help="use the files already in --keep-files")
    args = p.parse_args(argv)
    for flag in ("batch", "rounds", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.keras_threads < 0:
        p.error("--keras-threads must be >= 0")
    if args.reuse and not args.keep_files:
        p.error("--reuse needs --keep-files")
    return args


def main(argv=None):
    args = parse_args(argv)
    import numpy as np

    from _common import use_threads

    use_threads(args.keras_threads)  # before TensorFlow runs an op
    from bnn_device_memory import export, keras_model, parse_methods
    from edge.runner import TrainingModel
    from keras_coherence.binary.models import MODEL_NAMES

    if args.model not in MODEL_NAMES:
        raise SystemExit(f"--model: unknown model {args.model!r}; known: {', '.join(MODEL_NAMES)}")
    methods = parse_methods(args.methods)
    methods_to_time, pairs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep_files or tmp
        os.makedirs(folder, exist_ok=True)
        for method in methods:
            path = os.path.join(folder, f"{args.model}_{method}_{args.batch}.tflite")
            if not (args.reuse and os.path.isfile(path)):
                why = export(args.model, method, args.batch, path)
                if why is not None:
                    raise SystemExit(f"{args.model} {method} does not lower: {why}")
            device = TrainingModel(path, num_threads=args.threads)
            model = keras_model(args.model, method)
            rng = np.random.default_rng(0)
            x = rng.uniform(-1, 1, size=(args.batch,) + device.input_shape).astype(np.float32)
            y = rng.integers(0, device.num_classes, size=args.batch).astype(np.int32)
            methods_to_time.append(Method(f"litert_{method}", lambda d=device, x=x, y=y: d.train_step(x, y)))
            methods_to_time.append(Method(f"keras_{method}", lambda m=model, x=x, y=y: m.train_on_batch(x, y)))
            pairs[f"litert_{method}"] = f"keras_{method}"
        samples = interleaved(methods_to_time, rounds=args.rounds, warmup=1)
    print(f"{args.model} batch {args.batch}: LiteRT {args.threads} thread(s), "
          f"TensorFlow {args.keras_threads or 'default'} thread(s), {args.rounds} rounds")
    for s in summarize(samples, pairs).values():
        ratio = f"  {s.ratio:.2f}x keras" if s.ratio is not None else ""
        print(f"{s.name:24s} {s.median_ms:9.1f} ms{ratio}")


if __name__ == "__main__":
    main()
