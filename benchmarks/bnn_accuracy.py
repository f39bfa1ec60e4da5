"""Binary MLP on the embedded MNIST: standard vs low-memory training, test accuracy.

Trains the paper's 784-256-256-256-256-10 binary MLP (Wang et al., arXiv 2102.04270)
with each method for the same epochs, batch size, optimizer and seed, and prints the
test accuracies (the issue asks for low-memory within 2 points of standard).

    .venv/bin/python benchmarks/bnn_accuracy.py [--epochs 10] [--batch-size 100]
        [--methods standard,low_memory,low_memory_po2] [--optimizer adam] [--seeds 0]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if os.path.dirname(_HERE) not in sys.path:  # the package itself, when not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))
import _timing  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--methods", default="standard,low_memory,low_memory_po2")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (median reported)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--ablation", action="store_true",
                   help="also low_memory with one technique switched off at a time")
    return p.parse_args(argv)


def ablations():
    """``(label, LowMemoryConfig)``: the paper's method with one technique off each."""
    from keras_coherence.binary.config import LowMemoryConfig
    return [("low_memory -retention", LowMemoryConfig(binary_activation_retention=False)),
            ("low_memory -l1_bn", LowMemoryConfig(l1_batchnorm=False)),
            ("low_memory -binary_dW", LowMemoryConfig(binarize_weight_grads=False)),
            ("low_memory fp32 dX", LowMemoryConfig(activation_grad="float32")),
            ("low_memory fp32 latent", LowMemoryConfig(latent_weights="float32"))]


def main(argv=None):
    args = parse_args(argv)
    from keras_coherence.binary.training import train_bnn

    seeds = [int(s) for s in args.seeds.split(",")]
    rows, accuracy = [], {}
    methods = [(m, m) for m in args.methods.split(",")]
    if args.ablation:
        methods += ablations()
    for method, config in methods:
        results = [train_bnn(args.model, config, epochs=args.epochs,
                             batch_size=args.batch_size, optimizer=args.optimizer,
                             learning_rate=args.learning_rate, seed=seed,
                             max_examples=args.max_examples) for seed in seeds]
        accs = [r.test_accuracy for r in results]
        accuracy[method] = statistics.median(accs)
        rows.append((method, args.optimizer, args.epochs, args.batch_size,
                     " ".join(f"{100 * a:.2f}" for a in accs),
                     f"{100 * statistics.median(r.summary()['train_accuracy'] for r in results):.2f}",
                     f"{statistics.median(r.seconds for r in results):.1f}"))
        print(f"{method}: test accuracy {', '.join(f'{100 * a:.2f}%' for a in accs)}",
              flush=True)
    header = ("method", "optimizer", "epochs", "batch", "test acc % (per seed)",
              "final train acc %", "fit s")
    print()
    print(_timing.markdown_table(header, rows))
    if "standard" in accuracy:
        for method, acc in accuracy.items():
            if method != "standard":
                gap = 100 * (accuracy["standard"] - acc)
                verdict = "within" if abs(gap) <= 2.0 else "NOT within"
                print(f"{method}: {gap:+.2f} points below standard ({verdict} 2 points)")


if __name__ == "__main__":
    main()
