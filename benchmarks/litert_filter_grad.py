"""LiteRT time of a convolution's kernel gradient, written two ways (builtins only).

* ``conv``: ``ops.conv_filter_grad``, the batch-as-channel ``CONV_2D`` the device
  training export uses;
* ``taps_fc``: one ``FULLY_CONNECTED`` per kernel tap, ``x`` sliced and transposed
  times the transposed ``dz`` (``ops._fully_connected``, pinned transposes);
* ``tf_conv``: the ``conv`` graph run by TensorFlow itself (``--tf-threads``), the
  reference for how fast LiteRT's builtin convolution is on this CPU.

Each is converted alone and run in LiteRT without XNNPACK (as ``python -m edge train``
opens a model), interleaved round by round; the outputs are checked against each other.
Default shape: CNV's ``conv_2`` at batch 100 (``[100, 30, 30, 64]`` → ``[3, 3, 64, 64]``).

    nice -n 19 .venv/bin/python benchmarks/litert_filter_grad.py [--batch 100] [--rounds 5] [--tf-threads 1]
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
    p.add_argument("--size", type=int, default=30, help="input height and width")
    p.add_argument("--channels", type=int, default=64, help="input and output channels")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tf-threads", type=int, default=0,
                   help="TensorFlow's intra- and inter-op threads for the tf_conv row (0: its choice)")
    args = p.parse_args(argv)

    import numpy as np

    from _common import litert_runner, use_threads
    from keras_coherence import tf
    from keras_coherence.binary import ops

    use_threads(args.tf_threads)

    n, h, c, k = args.batch, args.size, args.channels, 3
    ho = h - k + 1
    specs = [tf.TensorSpec([n, h, h, c], tf.float32), tf.TensorSpec([n, ho, ho, c], tf.float32)]

    def conv(x, dz):
        return ops.conv_filter_grad(x, dz, (k, k), (1, 1), "VALID")

    def taps_fc(x, dz):
        dz_t = tf.transpose(tf.reshape(dz, [-1, c]))
        taps = [ops._fully_connected(tf.transpose(tf.reshape(x[:, i:i + ho, j:j + ho, :], [-1, c])), dz_t,
                                     transposed=("a", "b"))
                for i in range(k) for j in range(k)]
        return tf.reshape(tf.stack(taps), [k, k, c, c])

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, h, h, c)).astype(np.float32)
    dz = rng.normal(size=(n, ho, ho, c)).astype(np.float32)
    runners, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("conv", conv), ("taps_fc", taps_fc)):
            runners[name] = litert_runner(fn, specs, (x, dz), tmp, name, outputs)
        # the same graph as conv, run by TensorFlow (its CPU kernels, its threads)
        tf_conv = tf.function(conv, input_signature=specs, autograph=False)
        x_t, dz_t = tf.constant(x), tf.constant(dz)
        runners["tf_conv"] = lambda: outputs.__setitem__("tf_conv", tf_conv(x_t, dz_t).numpy())
        samples = interleaved([Method(name, run) for name, run in runners.items()], rounds=args.rounds)
    scale = float(np.abs(outputs["conv"]).max())
    diff = max(float(np.abs(outputs["conv"] - outputs[other]).max()) for other in ("taps_fc", "tf_conv"))
    if diff > 1e-4 * scale:
        raise SystemExit(f"error: the kernel gradients differ by {diff} (max |dW| {scale})")
    for s in summarize(samples, {"taps_fc": "conv", "conv": "tf_conv"}).values():
        ratio = f"  {s.ratio:.2f}x {'tf_conv' if s.name == 'conv' else 'conv'}" if s.ratio is not None else ""
        print(f"{s.name:8s} {s.median_ms:9.1f} ms{ratio}")
    print(f"max |difference| {diff:.2e} of max |dW| {scale:.2e}")


if __name__ == "__main__":
    main()
