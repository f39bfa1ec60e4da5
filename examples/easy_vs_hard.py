"""Easy vs hard examples: do examples learned early generalize better among themselves?

Experiment 2 of docs/aggregation.md: the "easy vs hard" experiment of Zielinski,
Krishnan & Chatterjee ("Weak and Strong Gradient Directions", 2020, section 4.4 of
the research notes) at small scale. The Coherent Gradients hypothesis predicts that
examples fitted early ("easy") are those whose gradients many other examples share,
so a model trained on easy examples should generalize to other easy examples much
better than a model trained on hard examples generalizes to other hard ones.

For each seed:

1. Train the model with SGD for ``--split-epochs`` epoch(s) (default 1) on the
   whole (clean) training set. **Easy** = training examples it then classifies
   correctly, **hard** = the others.
2. Make the pools comparable. Hard examples are not spread evenly over the classes
   (after one epoch some digits are barely learned), so by default (``--match
   class``) each class contributes as many easy as hard examples -- the smaller of
   its two counts, drawn at random -- and the two pools have the same size *and* the
   same label distribution. ``--match size`` only subsamples the larger pool (easy)
   to the size of the smaller; ``--match none`` keeps every example. A third pool,
   **random**, drawn from the whole training set (easy and hard mixed) with the same
   size (and per-class counts), is the control. Each pool is split 80/20
   (``--holdout``) into train / held-out parts.
3. Train a fresh model (new initial weights) on each pool's train part for
   ``--epochs`` epochs and evaluate it on every pool's held-out part and on the
   real test set.

Run from the repository root::

    python examples/easy_vs_hard.py                     # 10 seeds, about 3.5 minutes on 2 CPU cores
    python examples/easy_vs_hard.py --seeds 3 --match size --out /tmp/evh --plot /tmp/evh/plot.png

Writes ``<out>/results.csv`` (one row per seed, train pool and evaluation set),
``<out>/summary.json`` and the plot (default ``docs/easy_vs_hard.png``), and prints
mean ± standard deviation over seeds.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_coherence import __version__  # noqa: E402
from keras_coherence.workflows import experiments as ex  # noqa: E402
from keras_coherence import keras, tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLS = ("easy", "hard", "random")
EVALS = ("easy", "hard", "random", "test")


def parse_args(argv=None):
    p = ex.example_parser(__doc__)
    p.add_argument("--max-train", type=int, default=0, help="use the first N training examples (0 = all)")
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--hidden", default="256,256,256", help="mlp hidden widths")
    p.add_argument("--split-epochs", type=int, default=1,
                   help="epochs of SGD before splitting into easy (learned) and hard")
    p.add_argument("--epochs", type=int, default=100, help="epochs of the models trained on each pool")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (no momentum)")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction of each pool")
    p.add_argument("--match", default="class", choices=("class", "size", "none"),
                   help="class: per class, subsample easy and hard to the same count (same size "
                        "and label distribution); size: subsample the larger pool to the size of "
                        "the smaller; none: keep every example")
    p.add_argument("--seeds", type=int, default=10, help="repeat with seeds 0..N-1")
    p.add_argument("--out", default=os.path.join("runs", "easy_vs_hard"))
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "easy_vs_hard.png"))
    return p.parse_args(argv)


def _fit(build, x, y, args, seed):
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = ex.build_arm_model("sgd", build(), args.lr)
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs_now, shuffle=True, verbose=0)
    return model


def run_seed(seed, args, x_train, y_train, x_test, y_test, build):
    rng = np.random.default_rng(seed)
    args.epochs_now = args.split_epochs
    splitter = _fit(build, x_train, y_train, args, seed)
    pred = np.argmax(splitter.predict(x_train, batch_size=1000, verbose=0), axis=1)
    easy_idx = np.flatnonzero(pred == y_train)
    hard_idx = np.flatnonzero(pred != y_train)
    split_info = {"seed": seed, "learned": len(easy_idx), "not_learned": len(hard_idx),
                  "train_accuracy_after_split_epochs": len(easy_idx) / len(y_train)}
    if min(len(easy_idx), len(hard_idx)) < 10:
        raise SystemExit(f"seed {seed}: only {len(easy_idx)} easy / {len(hard_idx)} hard examples; "
                         "change --split-epochs.")
    pools = {"easy": rng.permutation(easy_idx), "hard": rng.permutation(hard_idx)}
    everyone = rng.permutation(len(y_train))
    if args.match == "class":
        # Per class, as many easy as hard examples (the smaller count); the random
        # control gets the same per-class counts from the whole training set.
        counts = {c: min(np.sum(y_train[pools["easy"]] == c), np.sum(y_train[pools["hard"]] == c))
                  for c in np.unique(y_train)}
        pick = lambda idx: rng.permutation(np.concatenate(  # noqa: E731
            [idx[y_train[idx] == c][:k] for c, k in counts.items()]))
        pools = {"easy": pick(pools["easy"]), "hard": pick(pools["hard"]), "random": pick(everyone)}
    else:
        if args.match == "size":
            size = min(len(pools["easy"]), len(pools["hard"]))
            pools = {k: v[:size] for k, v in pools.items()}
        size = min(len(v) for v in pools.values())  # the random control: as large as the smaller pool
        pools["random"] = everyone[:size]
    split_info["hard_class_counts"] = np.bincount(y_train[hard_idx], minlength=int(y_train.max()) + 1).tolist()
    parts = {}
    for name, idx in pools.items():
        n_out = int(round(args.holdout * len(idx)))
        parts[name] = {"train": idx[n_out:], "held_out": idx[:n_out]}
    split_info["pool_sizes"] = {k: {"train": len(v["train"]), "held_out": len(v["held_out"])}
                                for k, v in parts.items()}
    rows = []
    args.epochs_now = args.epochs
    for name in POOLS:
        tr = parts[name]["train"]
        model = _fit(build, x_train[tr], y_train[tr], args, seed * 1000 + 1 + POOLS.index(name))
        train_acc = ex.accuracy(model, x_train[tr], y_train[tr])
        for ev in EVALS:
            if ev == "test":
                acc = ex.accuracy(model, x_test, y_test)
                n = len(y_test)
            else:
                ho = parts[ev]["held_out"]
                acc = ex.accuracy(model, x_train[ho], y_train[ho])
                n = len(ho)
            rows.append({"seed": seed, "train_pool": name, "train_size": len(tr),
                         "train_accuracy": train_acc, "eval": ev, "eval_size": n, "accuracy": acc})
    return split_info, rows


def main(argv=None):
    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test), num_classes = ex.load_train_test(
        args.dataset, args.data_dir, args.max_train)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    build = ex.model_builder(args.model, x_train.shape[1:], num_classes, hidden)
    print(f"easy vs hard: {args.model} on {args.dataset} ({len(x_train)} training examples); split after "
          f"{args.split_epochs} epoch(s) of SGD lr {args.lr}, batch {args.batch_size}; pools matched "
          f"by {args.match}, {args.holdout:.0%} held out; "
          f"{args.epochs} epochs per pool; {args.seeds} seed(s)", flush=True)
    t0 = time.perf_counter()
    splits, rows = [], []
    for seed in range(args.seeds):
        info_s, rows_s = run_seed(seed, args, x_train, y_train, x_test, y_test, build)
        splits.append(info_s)
        rows += rows_s
        own = {r["train_pool"]: r["accuracy"] for r in rows_s if r["eval"] == r["train_pool"]}
        sizes = info_s["pool_sizes"]
        print(f"  seed {seed}: {info_s['learned']} easy / {info_s['not_learned']} hard after "
              f"{args.split_epochs} epoch(s); pools of {sizes['hard']['train']}+{sizes['hard']['held_out']}"
              f" (hard); easy->easy {own['easy']:.3f}  hard->hard {own['hard']:.3f}  "
              f"random->random {own['random']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    ex.write_csv(os.path.join(args.out, "results.csv"), rows)
    table = aggregate(rows)
    own = {p: [r["accuracy"] for r in rows if r["train_pool"] == p and r["eval"] == p] for p in POOLS}
    gap = np.subtract(own["easy"], own["hard"])
    table["easy_minus_hard"] = {"mean": float(gap.mean()), "std": float(gap.std(ddof=1)) if len(gap) > 1 else 0.0,
                                "n": int(len(gap)), "positive": int(np.sum(gap > 0))}
    summary = {"config": {k: v for k, v in vars(args).items() if k != "epochs_now"},
               "pools_matched_by": args.match,
               "splits": splits, "mean_std": table,
               "wall_seconds": time.perf_counter() - t0,
               "versions": {"keras_coherence": __version__, "tensorflow": tf.__version__}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    plot(table, args.plot, title=f"Easy vs hard: {args.model} on {args.dataset}, pools matched by "
         f"{args.match}\ntrained on one pool, evaluated on held-out parts ({args.seeds} seeds, mean ± sd)")
    print()
    print(format_table(table, splits))
    print(f"\nwrote {os.path.join(args.out, 'results.csv')}, {os.path.join(args.out, 'summary.json')}, "
          f"{args.plot}")
    return summary


def aggregate(rows):
    """{train_pool: {eval: {"mean", "std", "n"}}} plus the training accuracy."""
    table = {}
    for pool in POOLS:
        table[pool] = {}
        for ev in EVALS + ("train",):
            key = "train_accuracy" if ev == "train" else "accuracy"
            vals = [r[key] for r in rows if r["train_pool"] == pool and (ev == "train" or r["eval"] == ev)]
            if ev == "train":
                vals = vals[::len(EVALS)]  # one per seed
            table[pool][ev] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1
                               else 0.0, "n": len(vals)}
    return table


def format_table(table, splits):
    learned = [s["learned"] for s in splits]
    lines = [f"easy (learned after the split epochs): {np.mean(learned):.0f} ± {np.std(learned):.0f} of "
             f"{splits[0]['learned'] + splits[0]['not_learned']} training examples; pool sizes (train + "
             f"held out): {splits[0]['pool_sizes']['easy']['train']} + {splits[0]['pool_sizes']['easy']['held_out']}"
             f" easy, {splits[0]['pool_sizes']['hard']['train']} + {splits[0]['pool_sizes']['hard']['held_out']}"
             f" hard (seed 0)", "",
             "| trained on | held-out easy | held-out hard | held-out random | test set | own training set |",
             "|---|---|---|---|---|---|"]
    for pool in POOLS:
        cells = [f"{table[pool][ev]['mean']:.3f} ± {table[pool][ev]['std']:.3f}" for ev in EVALS + ("train",)]
        own = POOLS.index(pool)
        cells[own] = f"**{cells[own]}**"
        lines.append(f"| {pool} | " + " | ".join(cells) + " |")
    gap = table["easy_minus_hard"]
    lines += ["", f"easy->easy minus hard->hard, paired by seed: {gap['mean']:+.3f} ± {gap['std']:.3f} "
                  f"(positive in {gap['positive']} of {gap['n']} seeds)"]
    return "\n".join(lines)


def plot(table, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(EVALS)
    labels = {"easy": "held-out easy", "hard": "held-out hard", "random": "held-out random",
              "test": "real test set"}
    for j, ev in enumerate(EVALS):
        xs = [i + (j - (len(EVALS) - 1) / 2) * width for i in range(len(POOLS))]
        means = [table[p][ev]["mean"] for p in POOLS]
        stds = [table[p][ev]["std"] for p in POOLS]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=labels[ev], color=f"C{j}")
        for i, (bar, m, sd) in enumerate(zip(bars, means, stds)):
            if POOLS[i] == ev:  # a pool's own held-out part: the comparison of interest
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
                bar.set_hatch("//")
            ax.annotate(f"{m:.2f}", (bar.get_x() + bar.get_width() / 2, m + sd), ha="center",
                        va="bottom", fontsize="x-small", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(POOLS)))
    ax.set_xticklabels([f"trained on {p}" for p in POOLS])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.1)
    ax.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=f"C{j}", label=labels[ev]) for j, ev in enumerate(EVALS)]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="own held-out part"))
    ax.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.09),
              ncol=len(handles))
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    main()
