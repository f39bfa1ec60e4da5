"""Real vs random labels: how the m-coherence of per-example gradients evolves.

Reproduces, at small scale, the central measurement of Chatterjee & Zielinski
("Making Coherence Out of Nothing at All", arXiv 2008.01217; "On the Generalization
Mystery in Deep Learning", arXiv 2203.10036): the same MLP is trained with plain SGD
twice on the embedded MNIST (4,000 training images), once with the real labels and
once with 100% random labels (``corrupt_labels(fraction=1.0, mode="random")``), and
the m-coherence ``||sum_i g_i||^2 / sum_i ||g_i||^2`` of a fixed probe sample of
training examples (with the labels used for training) is measured at log-spaced and
regular steps, together with the training and test accuracy.

Run from the repository root::

    python examples/coherence_real_vs_random.py                 # ~4 min on 2 CPU cores
    python examples/coherence_real_vs_random.py --epochs 20 --out /tmp/rvr --plot /tmp/rvr/plot.png

Writes ``<out>/real.csv``, ``<out>/random.csv``, ``<out>/summary.json`` and the
comparison plot (default ``docs/coherence_real_vs_random.png``), and prints a summary.
"""
import argparse
import csv
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_coherence import data, gradient_stats  # noqa: E402
from keras_coherence import keras, tf  # noqa: E402
from keras_coherence.models import mlp  # noqa: E402
from keras_coherence.plots import plot_coherence_comparison  # noqa: E402


class CoherenceAndAccuracy(keras.callbacks.Callback):
    """At the given global steps (0 = before training), record the m-coherence of the
    probe sample (whole model and per layer, via ``gradient_stats``) and the accuracy
    on the training set (training labels) and the test set."""

    def __init__(self, schedule, probe, train, test, log_every=None):
        super().__init__()
        self.schedule = set(int(s) for s in schedule)
        self.probe, self.train, self.test = probe, train, test
        self.rows = []
        self.step = 0
        self.epoch = 0
        self.log_every = log_every

    @staticmethod
    def _accuracy(model, x, y):
        logits = model.predict(x, batch_size=2048, verbose=0)
        return float(np.mean(np.argmax(logits, axis=1) == y))

    def measure(self):
        stats = gradient_stats(self.model, *self.probe)
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
               "m_coherence": stats.m_coherence, "alpha": stats.alpha,
               "train_accuracy": self._accuracy(self.model, *self.train),
               "probe_accuracy": self._accuracy(self.model, *self.probe),
               "test_accuracy": self._accuracy(self.model, *self.test)}
        for name, layer in stats.layers.items():
            row[f"m_coherence/{name}"] = layer.m_coherence
        self.rows.append(row)
        return row

    def on_train_begin(self, logs=None):
        self.steps_per_epoch = self.params["steps"]
        if 0 in self.schedule:
            self.measure()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step in self.schedule:
            self.measure()

    def on_epoch_end(self, epoch, logs=None):
        if self.log_every and ((epoch + 1) % self.log_every == 0 or epoch + 1 == self.params["epochs"]):
            r = self.rows[-1] if self.rows else {}
            print(f"    epoch {epoch + 1:4d}  loss {logs.get('loss', float('nan')):.3f}  "
                  f"train acc {logs.get('accuracy', float('nan')):.3f}  "
                  f"m-coherence {r.get('m_coherence', float('nan')):.3g} (step {r.get('step')})",
                  flush=True)


def schedule_steps(total_steps, n_log, n_regular):
    """Step 0, ``n_log`` log-spaced steps in [1, total] and ``n_regular`` regular ones."""
    log_steps = np.unique(np.round(np.geomspace(1, total_steps, n_log)).astype(int))
    regular = np.unique(np.linspace(0, total_steps, n_regular + 1).round().astype(int))
    return sorted(set([0, total_steps]) | set(log_steps.tolist()) | set(regular.tolist()))


def run(label, y_fit, args, x_train, x_test, y_test, probe_idx):
    keras.utils.set_random_seed(args.seed)  # same initial weights and batch order in both runs
    model = mlp(x_train.shape[1:], 10, hidden=args.hidden, name=f"mlp_{label}")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=args.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    cb = CoherenceAndAccuracy(
        schedule_steps(total, args.log_points, args.regular_points),
        probe=(x_train[probe_idx], y_fit[probe_idx]), train=(x_train, y_fit), test=(x_test, y_test),
        log_every=max(1, args.epochs // 10),
    )
    print(f"[{label}] {args.epochs} epochs = {total} steps, {len(cb.schedule)} measurements", flush=True)
    t0 = time.perf_counter()
    model.fit(x_train, y_fit, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              callbacks=[cb], verbose=0)
    return cb.rows, time.perf_counter() - t0


def summarize(rows, seconds):
    mc = [r["m_coherence"] for r in rows]
    peak = int(np.argmax(mc))
    after0 = rows[1:] if len(rows) > 1 else rows
    low = min(range(len(after0)), key=lambda i: after0[i]["m_coherence"])
    return {
        "initial": {"step": rows[0]["step"], "m_coherence": mc[0]},
        "peak": {"step": rows[peak]["step"], "epoch": rows[peak]["epoch"], "m_coherence": mc[peak],
                 "train_accuracy": rows[peak]["train_accuracy"]},
        "minimum_after_step_0": {"step": after0[low]["step"], "m_coherence": after0[low]["m_coherence"]},
        "final": {"step": rows[-1]["step"], "m_coherence": mc[-1],
                  "train_accuracy": rows[-1]["train_accuracy"],
                  "test_accuracy": rows[-1]["test_accuracy"]},
        "measurements": len(rows),
        "train_seconds": seconds,
    }


def write_csv(rows, path):
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="embedded_mnist", help="embedded_mnist or a prepared TFDS name")
    p.add_argument("--epochs", type=int, default=100, help="epochs of each run")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (no momentum)")
    p.add_argument("--hidden", default="256,256", help="hidden widths of the MLP")
    p.add_argument("--max-train", type=int, default=None, help="cap on training examples")
    p.add_argument("--probe-size", type=int, default=512, help="fixed probe sample of training examples")
    p.add_argument("--log-points", type=int, default=40, help="log-spaced measurement steps")
    p.add_argument("--regular-points", type=int, default=100, help="evenly spaced measurement steps")
    p.add_argument("--smooth", type=int, default=5, help="plot a running median over this many measurements (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "coherence_real_vs_random"), help="CSV/JSON dir")
    p.add_argument("--plot", default=os.path.join("docs", "coherence_real_vs_random.png"), help="plot path")
    args = p.parse_args(argv)
    args.hidden = tuple(int(w) for w in args.hidden.split(",") if w)
    tf.get_logger().setLevel("ERROR")

    start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = (
        data.load_dataset(args.dataset, split=s, max_examples=args.max_train if s == "train" else None)
        for s in ("train", "test"))
    y_random, changed = data.corrupt_labels(y_train, 1.0, num_classes=10, seed=args.seed, mode="random")
    probe_idx = np.sort(np.random.default_rng(args.seed).choice(
        len(x_train), size=min(args.probe_size, len(x_train)), replace=False))
    print(f"{args.dataset}: {len(x_train)} training examples ({changed.mean():.1%} of the random "
          f"labels differ from the real ones), probe of {len(probe_idx)}; MLP {args.hidden}, "
          f"SGD lr {args.lr}, batch {args.batch_size}", flush=True)

    runs, summary = {}, {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}
    for label, y_fit in (("real labels", y_train), ("random labels", y_random)):
        rows, seconds = run(label.split()[0], y_fit, args, x_train, x_test, y_test, probe_idx)
        runs[label] = rows
        summary[label] = summarize(rows, seconds)

    os.makedirs(args.out, exist_ok=True)
    for label, rows in runs.items():
        write_csv(rows, os.path.join(args.out, f"{label.split()[0]}.csv"))
    plot_coherence_comparison(
        runs, args.plot,
        title=f"m-coherence of a fixed {len(probe_idx)}-example training probe\n"
              f"MLP {'x'.join(map(str, args.hidden))}, SGD lr {args.lr}, {len(x_train)} {args.dataset} images",
        per_layer=False, xscale="symlog", dpi=100, figsize=(7.5, 4.2),
        secondary_key="train_accuracy", secondary_label="train accuracy\n(training labels)",
        smooth=args.smooth,
    )
    summary["wall_seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(f"\n{'run':<14} {'initial':>8} {'peak (step)':>16} {'min (step)':>14} {'final':>8} "
          f"{'train acc':>9} {'test acc':>8}")
    for label in runs:
        s = summary[label]
        print(f"{label:<14} {s['initial']['m_coherence']:8.3g} "
              f"{s['peak']['m_coherence']:8.3g} ({s['peak']['step']:5d}) "
              f"{s['minimum_after_step_0']['m_coherence']:6.3g} ({s['minimum_after_step_0']['step']:5d}) "
              f"{s['final']['m_coherence']:8.3g} {s['final']['train_accuracy']:9.3f} "
              f"{s['final']['test_accuracy']:8.3f}")
    print(f"\nwrote {args.out}/{{real.csv, random.csv, summary.json}} and {args.plot} "
          f"in {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
