"""LiteRT time of cutting a batch into parts: ``STRIDED_SLICE`` (what ``t[a:b]``
converts to) against ``SLICE`` (``tf.slice``, what ``binary.ops.take`` emits).

The device training export cuts activations, their packed bits and their gradients
along the batch into parts that fit its scratch budget. LiteRT runs ``STRIDED_SLICE``
element by element in its reference kernel, while ``SLICE`` copies contiguous runs.
Each form is converted alone and run in LiteRT without XNNPACK (as ``python -m edge
train`` opens a model), interleaved round by round, for float32 and bool; the parts are
summed and checked against each other. Default: CNV's ``conv_2`` input at batch 100,
``[100, 30, 30, 64]``, in parts of 8 examples (as the export cuts it).

    nice -n 19 .venv/bin/python benchmarks/litert_slice.py [--batch 100] [--part 8] [--rounds 5]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--size", type=int, default=30, help="height and width")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--part", type=int, default=8, help="examples per part")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    for flag in ("batch", "size", "channels", "part", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")

    import numpy as np

    from _common import litert_runner
    from keras_coherence import tf
    from keras_coherence.binary import ops

    n, shape = args.batch, [args.batch, args.size, args.size, args.channels]
    chunks = [slice(i, min(i + args.part, n)) for i in range(0, n, args.part)]

    def summed(parts):  # one small output that reads every part
        return tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32), axis=0) for t in parts])

    forms = {"strided_slice": lambda t: summed([t[c] for c in chunks]),
             "slice": lambda t: summed([ops.take(t, c) for c in chunks])}
    rng = np.random.default_rng(0)
    data = {"float32": rng.normal(size=shape).astype(np.float32), "bool": rng.random(shape) < 0.5}
    runners, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, value in data.items():
            spec = [tf.TensorSpec(shape, tf.as_dtype(value.dtype))]
            for form, fn in forms.items():
                name = f"{form}_{dtype}"
                runners[name] = litert_runner(fn, spec, (value,), tmp, name, outputs)
        samples = interleaved([Method(name, run) for name, run in runners.items()], rounds=args.rounds)
    for dtype in data:
        diff = float(np.abs(outputs[f"slice_{dtype}"] - outputs[f"strided_slice_{dtype}"]).max())
        if diff > 1e-3:
            raise SystemExit(f"error: the two forms differ for {dtype} by {diff}")
    pairs = {f"strided_slice_{d}": f"slice_{d}" for d in data}
    for s in summarize(samples, pairs).values():
        ratio = f"  {s.ratio:.1f}x slice" if s.ratio is not None else ""
        print(f"{s.name:22s} {s.median_ms:8.2f} ms{ratio}")
    print(f"{len(chunks)} parts of {shape}")


if __name__ == "__main__":
    main()
