"""Side by side with QKeras 0.9.0: ``quantized_bits(b, 0, 1, alpha="auto_po2")`` vs
``MSQEPo2Baseline`` (and the fixed ``MSQEPo2``) on identical weights.

1. Equivalence: for every bit width 2..8 and a set of kernels (normal, Laplace,
   normal with a few large outliers; Conv2D HWIO and Dense shapes, and the Conv2D
   kernels of an untrained MobileNetV2), the fraction of per-channel exponents where
   ``MSQEPo2Baseline(per_channel=True)`` equals log2 of QKeras's scale, and the
   fraction of quantized values that are equal (they may differ only on exact
   rounding ties: QKeras rounds half away from zero, the library half to even).
2. Stability: the same kernels follow a noisy SGD-like walk
   (``w <- w - lr * (w * decay + noise)``) for ``--steps`` steps; every method
   recomputes its exponents each step. Reported: flip rate (exponents that changed
   from the previous step / all exponents, per step), the fraction of channels that
   flipped at least once, and A->B->A oscillations within two steps.

QKeras is installed only for this benchmark, e.g. beside the project's venv:

    .venv/bin/pip install --no-deps --target /tmp/qkeras qkeras==0.9.0 networkx pyparser
    PYTHONPATH=/tmp/qkeras .venv/bin/python benchmarks/qkeras_side_by_side.py
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="steps of the stability walk")
    p.add_argument("--bits", type=int, default=4, help="bit width of the stability walk")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def kernels(rng, tf_keras):
    """name -> float32 kernel (last axis = output channels)."""
    out = {}
    for shape in ((3, 3, 32, 64), (256, 64)):
        tag = "conv" if len(shape) == 4 else "dense"
        out[f"{tag}-normal"] = rng.normal(size=shape) * 0.05
        out[f"{tag}-laplace"] = rng.laplace(size=shape) * 0.05
        w = rng.normal(size=shape) * 0.05
        flat = w.reshape(-1)
        flat[rng.choice(flat.size, size=max(1, flat.size // 500), replace=False)] *= 20.0  # 0.2% outliers
        out[f"{tag}-outliers"] = w
    net = tf_keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    for layer in net.layers:
        if type(layer).__name__ == "Conv2D":
            out[f"mobilenetv2/{layer.name}"] = layer.kernel.numpy()
    return {k: v.astype("float32") for k, v in out.items()}


def main(argv=None):
    args = parse_args(argv)
    import numpy as np

    import keras_coherence  # noqa: F401  (Keras 2 policy first)
    from keras_coherence import keras, tf
    from keras_coherence.quantization import MSQEPo2, MSQEPo2Baseline

    try:
        import qkeras
        from qkeras.quantizers import quantized_bits
    except ImportError as err:
        sys.exit(f"QKeras is needed for this benchmark ({err}); install it only for it:\n"
                 "  .venv/bin/pip install --no-deps --target /tmp/qkeras qkeras==0.9.0 networkx pyparser\n"
                 "  PYTHONPATH=/tmp/qkeras .venv/bin/python benchmarks/qkeras_side_by_side.py")
    rng = np.random.default_rng(args.seed)
    tensors = kernels(rng, keras)
    print(f"QKeras {getattr(qkeras, '__version__', '?')} vs keras_coherence on {len(tensors)} kernels, "
          f"TF {tf.__version__}", flush=True)

    def qkeras_exponent(q, w):
        y = q(tf.constant(w)).numpy()
        # QKeras keeps scale * 2**(bits - 1) in q.scale (the integer part of its format).
        scale = np.asarray(q.scale, np.float64).reshape(-1) / 2.0 ** (q.bits - 1)
        return np.round(np.log2(scale)).astype(np.int64), y

    # 1. equivalence
    print("\n| bits | kernels | channels | exponents equal | values equal |")
    print("|---|---|---|---|---|")
    for bits in range(2, 9):
        eq_e = eq_v = n_e = n_v = 0
        for w in tensors.values():
            e_qk, y_qk = qkeras_exponent(quantized_bits(bits, 0, 1, alpha="auto_po2"), w)
            ours = MSQEPo2Baseline(bits=bits, per_channel=True)
            y = ours(tf.constant(w), training=True).numpy()
            e = ours.exponent().numpy().reshape(-1).astype(np.int64)
            eq_e += int(np.sum(e == e_qk))
            n_e += e.size
            eq_v += int(np.sum(y == y_qk))
            n_v += y.size
        print(f"| {bits} | {len(tensors)} | {n_e} | {eq_e / n_e:.4%} | {eq_v / n_v:.4%} |", flush=True)

    # 2. stability under a noisy walk
    def walk(make):
        """Per-step exponents of every kernel along the same walk; make() -> callable(w) -> exponents."""
        walk_rng = np.random.default_rng(args.seed + 1)
        quantizers = {name: make() for name in tensors}
        current = {name: w.copy() for name, w in tensors.items()}
        history = {name: [] for name in tensors}
        for _ in range(args.steps):
            for name, w in current.items():
                history[name].append(quantizers[name](w))
                noise = walk_rng.normal(size=w.shape).astype(np.float32) * np.std(w)
                current[name] = (w - args.lr * (0.1 * w + noise)).astype(np.float32)
        return {name: np.stack(h) for name, h in history.items()}  # [steps, channels]

    def qk_method():
        q = quantized_bits(args.bits, 0, 1, alpha="auto_po2")
        return lambda w: qkeras_exponent(q, w)[0]

    def ours(cls, **kw):
        def make():
            q = cls(bits=args.bits, per_channel=True, **kw)

            def step(w):
                q(tf.constant(w), training=True)
                return q.exponent().numpy().reshape(-1).astype(np.int64)
            return step
        return make

    methods = {
        "QKeras auto_po2": qk_method,
        "MSQEPo2Baseline": ours(MSQEPo2Baseline),
        "MSQEPo2 (fixes, no gradient weights)": ours(MSQEPo2, use_second_moments=False),
    }
    print(f"\nStability: {args.bits}-bit, {args.steps} steps, lr {args.lr}")
    print("| method | flip rate / step | channels that ever flip | A→B→A within 2 steps (of flips) |")
    print("|---|---|---|---|")
    for label, make in methods.items():
        hist = walk(make)
        flips = sum(int(np.sum(h[1:] != h[:-1])) for h in hist.values())
        slots = sum((h.shape[0] - 1) * h.shape[1] for h in hist.values())
        ever = sum(int(np.sum(np.any(h[1:] != h[:-1], axis=0))) for h in hist.values())
        channels = sum(h.shape[1] for h in hist.values())
        back = sum(int(np.sum((h[2:] == h[:-2]) & (h[1:-1] != h[:-2]))) for h in hist.values())
        print(f"| {label} | {flips / slots:.3%} | {ever / channels:.1%} | "
              f"{(back / flips if flips else 0.0):.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
