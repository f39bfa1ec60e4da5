"""Label noise: does robust gradient aggregation stop a network memorizing wrong labels?

Experiment 1 of docs/aggregation.md. Half of the training labels are corrupted
(``corrupt_labels(..., mode="uniform")``: each chosen example gets one of the *other*
classes), then the same network, from the same initial weights and with the same
batch order, is trained with each "arm":

* ``sgd``            plain mini-batch SGD (the mean gradient);
* ``winsorized:c=C`` winsorized gradient descent (Chatterjee, ICLR 2020): per
  coordinate, the C largest and C smallest per-example values are clipped;
* ``m3``             median of the means of 3 groups of the batch (Zielinski et al. 2020);
* ``rm3``            running median of the last 3 steps' gradients (same paper);
* ``ra3``            the running *average* of 3 steps, RM3's control.

After every epoch it records the accuracy on

* the **pristine** training examples (labels unchanged),
* the **corrupt** training examples w.r.t. the *noisy* labels they are trained on
  (memorization; a model that has not memorized them scores about 0 here, since a
  corrupt label is never the true class) and w.r.t. their true labels,
* the **test** set.

Defaults follow the ICLR 2020 winsorization setup at small scale: MLP 3x256 ReLU,
SGD lr 0.1 without momentum, batch 100, 50% label noise, on the offline embedded
MNIST (``--dataset`` takes any prepared tensorflow_datasets name). Run from the
repository root::

    python examples/label_noise.py                                # the default run, see below
    python examples/label_noise.py --arms sgd,rm3,ra3 --epochs 100 --max-train 4000 \
        --out runs/ln4000 --plot runs/ln4000/plot.png
    python examples/label_noise.py --arms sgd,winsorized:c=2 --epochs 5 --max-train 500 \
        --out /tmp/ln --plot /tmp/ln/plot.png

Winsorized arms form per-example gradients and can dominate the cost: with the
library's selection network (``c + 1 <= 8``) c = 1, 2, 4 cost about as much as SGD,
while c = 8 falls back to ``tf.math.top_k`` (about 12 s per epoch on 1,000 examples
on a busy 2-core machine). Measure yours with ``--epochs 2``. The default run (the
first 1,000 training examples, 60 epochs, 8 arms) took 15 minutes on a shared 2-core
machine, 13 of them for WGD c=8. Writes ``<out>/curves.csv`` (one row per arm
and evaluated epoch), ``<out>/summary.json`` and the plot (default
``docs/label_noise.png``), and prints a summary table.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_coherence import __version__, data  # noqa: E402
from keras_coherence.workflows import experiments as ex  # noqa: E402
from keras_coherence import keras, tf  # noqa: E402

DEFAULT_ARMS = "sgd,winsorized:c=1,winsorized:c=2,winsorized:c=4,winsorized:c=8,m3,rm3,ra3"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANELS = [("pristine_accuracy", "pristine training examples"),
          ("corrupt_accuracy", "corrupt examples, noisy labels\n(memorization)"),
          ("test_accuracy", "test set")]


def parse_args(argv=None):
    p = ex.example_parser(__doc__)
    p.add_argument("--max-train", type=int, default=1000,
                   help="training examples (the first N of the training split; 0 = all)")
    p.add_argument("--noise", type=float, default=0.5, help="fraction of training labels corrupted")
    p.add_argument("--noise-mode", default="uniform", choices=("uniform", "random", "permute"))
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--hidden", default="256,256,256", help="mlp hidden widths")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (no momentum)")
    p.add_argument("--arms", default=DEFAULT_ARMS,
                   help="comma-separated arms: sgd, winsorized:c=C, m3, rm3, ra3, ...")
    p.add_argument("--eval", default="every", choices=("every", "log"),
                   help="evaluate after every epoch, or at ~25 log-spaced epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, batch order, label noise")
    p.add_argument("--out", default=os.path.join("runs", "label_noise"))
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "label_noise.png"))
    p.add_argument("--print-every", type=int, default=10, help="progress line every N epochs (0: off)")
    p.add_argument("--replot", action="store_true",
                   help="train nothing: redraw the plot and reprint the table from <out>/curves.csv "
                        "and <out>/summary.json")
    return p.parse_args(argv)


def plot(runs, args, num_train, num_classes):
    noise = f"{args.noise:.0%} label noise ({args.noise_mode})"
    return ex.plot_accuracy_panels(
        runs, args.plot, PANELS, chance=1.0 / num_classes,
        title=f"{args.model} on {args.dataset} ({num_train} training examples), {noise}: "
              f"SGD lr {args.lr}, batch {args.batch_size}")


def replot(args):
    with open(os.path.join(args.out, "summary.json")) as f:
        summary = json.load(f)
    for key in ("model", "dataset", "noise", "noise_mode", "lr", "batch_size"):
        setattr(args, key, summary["config"][key])
    runs = {}
    for row in ex.read_rows(os.path.join(args.out, "curves.csv")):
        runs.setdefault(row["label"], []).append(row)
    plot(runs, args, summary["data"]["num_train"], summary["data"]["num_classes"])
    print(format_table(summary["arms"]))
    print(f"\nwrote {args.plot}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    try:
        arms = [ex.parse_arm(a) for a in args.arms.split(",") if a.strip()]
    except ValueError as err:
        raise SystemExit(f"label_noise.py: error: --arms: {err}") from None
    (x_train, y_train), (x_test, y_test), num_classes = ex.load_train_test(
        args.dataset, args.data_dir, args.max_train)
    for arm in arms:
        try:
            ex.check_arm(arm, args.batch_size, len(x_train))
        except ValueError as err:
            raise SystemExit(f"label_noise.py: error: --arms: {err}") from None
    y_fit, corrupt = data.corrupt_labels(y_train, args.noise, num_classes=num_classes,
                                         seed=args.seed, mode=args.noise_mode)
    x_pristine, x_corrupt = x_train[~corrupt], x_train[corrupt]
    subsets = {"pristine": (x_pristine, y_fit[~corrupt]),
               "corrupt": (x_corrupt, y_fit[corrupt]),         # the labels it is trained on
               "corrupt_true": (x_corrupt, y_train[corrupt]),  # the true labels
               "test": (x_test, y_test)}
    schedule = None if args.eval == "every" else ex.log_spaced_epochs(args.epochs, 25)

    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    keras.utils.set_random_seed(args.seed)
    build = ex.model_builder(args.model, x_train.shape[1:], num_classes, hidden)
    initial_weights = build().get_weights()  # every arm starts from these

    print(f"label noise: {args.model} {hidden if args.model == 'mlp' else ''} on {args.dataset}, "
          f"{len(x_train)} training examples ({int(corrupt.sum())} corrupt, {args.noise_mode}), "
          f"{len(x_test)} test; SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs; "
          f"arms: {', '.join(a.label for a in arms)}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    all_rows, runs, results = [], {}, []
    for arm in arms:
        keras.backend.clear_session()
        keras.utils.set_random_seed(args.seed)  # the same batch order for every arm
        base = build()
        base.set_weights(initial_weights)
        model = ex.build_arm_model(arm, base, args.lr)

        def progress(row, arm=arm):
            if args.print_every and row["epoch"] and (row["epoch"] % args.print_every == 0):
                print(f"  {arm.label:<9} epoch {row['epoch']:>4}  pristine {row['pristine_accuracy']:.3f}  "
                      f"corrupt {row['corrupt_accuracy']:.3f}  test {row['test_accuracy']:.3f}  "
                      f"({row['seconds']:.0f} s)", flush=True)

        tracker = ex.SubsetAccuracy(subsets, epochs=schedule, on_row=progress)
        t0 = time.perf_counter()
        model.fit(x_train, y_fit, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
                  callbacks=[tracker], verbose=0)
        wall = time.perf_counter() - t0
        rows = [{"arm": arm.spec, "label": arm.label, **r} for r in tracker.rows]
        runs[arm.label] = rows
        all_rows += rows
        ex.write_csv(os.path.join(args.out, "curves.csv"), all_rows)  # partial results survive
        results.append(_summarize(arm, rows, wall, tracker.steady_seconds_per_epoch()))
        r = results[-1]
        print(f"{arm.label:<9} done in {wall:.0f} s ({r['seconds_per_epoch']:.2f} s/epoch): final "
              f"pristine {r['final']['pristine']:.3f}, corrupt {r['final']['corrupt']:.3f}, "
              f"test {r['final']['test']:.3f}", flush=True)

    plot(runs, args, len(x_train), num_classes)
    summary = {
        "config": vars(args),
        "data": {"dataset": args.dataset, "num_train": int(len(x_train)), "num_test": int(len(x_test)),
                 "num_corrupt": int(corrupt.sum()), "num_classes": num_classes},
        "arms": results,
        "versions": {"keras_coherence": __version__, "tensorflow": tf.__version__},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print()
    print(format_table(results))
    print(f"\nwrote {os.path.join(args.out, 'curves.csv')}, {os.path.join(args.out, 'summary.json')}, "
          f"{args.plot}")
    return summary


def _summarize(arm, rows, wall, seconds_per_epoch):
    last = rows[-1]
    trained = [r for r in rows if r["epoch"] > 0]
    best = max(trained, key=lambda r: r["test_accuracy"])
    worst = max(trained, key=lambda r: r["corrupt_accuracy"])
    return {
        "arm": arm.spec, "label": arm.label, "wall_seconds": wall,
        "seconds_per_epoch": seconds_per_epoch,  # median, first epoch (tracing) left out
        "final": {"epoch": last["epoch"], "pristine": last["pristine_accuracy"],
                  "corrupt": last["corrupt_accuracy"], "corrupt_true": last["corrupt_true_accuracy"],
                  "test": last["test_accuracy"]},
        "best_test": {"epoch": best["epoch"], "value": best["test_accuracy"]},
        "max_corrupt": {"epoch": worst["epoch"], "value": worst["corrupt_accuracy"]},
        "max_pristine": max(r["pristine_accuracy"] for r in trained),
    }


def format_table(results):
    """The summary as a Markdown table."""
    lines = ["| arm | s/epoch | pristine (final) | corrupt, noisy labels (final / max) | "
             "corrupt, true labels (final) | test (final) | test (best @ epoch) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["final"]
        lines.append(
            f"| {r['label']} | {r['seconds_per_epoch']:.2f} | {f['pristine']:.3f} | "
            f"{f['corrupt']:.3f} / {r['max_corrupt']['value']:.3f} | {f['corrupt_true']:.3f} | "
            f"{f['test']:.3f} | {r['best_test']['value']:.3f} @ {r['best_test']['epoch']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
