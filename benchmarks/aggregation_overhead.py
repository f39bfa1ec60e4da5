"""What does a robust aggregator cost per training step?

Compares, interleaved round by round in one process, at batch 128 on random MNIST-shaped
data (28x28x1, 10 classes), for the MLP 784-512-512-10 and the CNN of
``coherence_overhead.py``:

* ``keras-plain``    -- Keras's own train function of the compiled plain model (reference);
* ``winsorized-cK``  -- Keras's own train function of ``with_aggregator(model, "winsorized:c=K")``
  (c=2 by default; ``--all-c`` adds c=1 and c=4; ``--with-top-k`` adds ``winsorized-cK-topk``,
  the same with ``tf.math.top_k`` instead of the selection network);
* ``m3``             -- ``with_aggregator(model, "m3:groups=3")``;
* ``rm3``            -- the plain model compiled with
  ``keras_coherence.optimizers.RunningMedian(SGD(lr), window=3)`` (skipped, with
  "RM3: not available", when that class does not exist).

Every method has its own compiled model sharing the same layers (so all train the same
weights) and its own SGD optimizer. Ratios are the median over rounds of the per-round
ratio to ``keras-plain``, in wall time and (column ``cpu ratio``) in the process's CPU
time, which waiting for a core on a shared machine does not inflate.

The batches come from ``Dataset.from_tensors``, so the train functions see a static batch
size (as in ``coherence_overhead.py``); ``--dynamic-batch`` feeds them batches of unknown
size, as ``fit`` on arrays does (winsorization then dispatches on the size at run time).

Before timing, one step of every timed winsorized aggregator and of M3 is checked, on a
fresh model and a batch of 16, against numpy: per-example gradients by a
one-example-at-a-time tape loop, then ``np.sort``-and-clip (or the median of group means);
the script exits non-zero on a mismatch.

    .venv/bin/python benchmarks/aggregation_overhead.py [--rounds N] [--models mlp,cnn] [--all-c]
"""
from __future__ import annotations

import functools
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if os.path.dirname(_HERE) not in sys.path:  # the package itself, when not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))
import _timing  # noqa: E402

# method -> model -> target ratio to keras-plain
TARGETS = {"winsorized": {"mlp": 4.0, "cnn": 3.0}, "m3": {"mlp": 1.3, "cnn": 1.3},
           "rm3": {"mlp": 1.1, "cnn": 1.1}}
RTOL = 1e-4
ATOL = 1e-5  # times the largest |value| of the variable's reference
CHECK_BATCH = 16


def parse_args(argv=None):
    p = _timing.timing_parser(__doc__, rounds=30)
    p.add_argument("--all-c", action="store_true", help="time winsorized c=1 and c=4 too")
    p.add_argument("--methods", default="winsorized,m3,rm3",
                   help="comma-separated subset of winsorized,m3,rm3")
    p.add_argument("--with-top-k", action="store_true",
                   help="also time winsorization by tf.math.top_k (Winsorized.use_network = False), "
                        "the path before the selection network (slow: ~1 s per MLP step)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="batches of statically unknown size, as fit() on arrays gives")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--no-check", action="store_true", help="skip the numpy check (not advised)")
    p.add_argument("--seed", type=int, default=0)
    args = _timing.parse_timing_args(p, argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in TARGETS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {tuple(TARGETS)}")
    args.cs = [1, 2, 4] if args.all_c else [2]
    return args


ARGS = parse_args()

import _common  # noqa: E402  (imports TensorFlow; runs no op)

_common.use_threads(ARGS.threads)  # before anything runs an op

import numpy as np  # noqa: E402

from _common import build, keras, keras_step, loss_obj, random_batch, require_rules, sgd, tf  # noqa: E402
from _timing import log  # noqa: E402
from keras_coherence.aggregation import aggregated_train_step, get, with_aggregator  # noqa: E402

try:
    from keras_coherence.optimizers import RunningMedian
except ImportError:  # being written elsewhere; the benchmark runs without it
    RunningMedian = None


# ----------------------------------------------------------------------------- check

def loop_per_example_grads(model, x, y):
    """``[n, *var.shape]`` float64 per variable: gradients of each example's term of
    Keras's mean loss (loss_i / n), one example at a time."""
    loss = loss_obj()
    n = int(x.shape[0])
    rows = []
    for i in range(n):
        with tf.GradientTape() as tape:
            li = loss(y[i:i + 1], model(x[i:i + 1], training=True))
        rows.append([g.numpy().astype(np.float64) / n
                     for g in tape.gradient(li, model.trainable_variables)])
    return [np.stack(gs) for gs in zip(*rows)]


def np_winsorized(g, c):
    """Sort each coordinate over examples, clip the c extremes on each side, sum."""
    s = np.sort(g, axis=0)
    return np.clip(g, s[c], s[len(g) - 1 - c]).sum(0)


def update_direction(model, aggregator, x, y):
    return [g for g, _ in aggregated_train_step(model, (x, y), aggregator)[2]]


def check(name, specs, seed, lr, dynamic):
    """One step of each aggregator in ``specs`` against numpy on a fresh model and a
    batch of CHECK_BATCH (of statically unknown size when ``dynamic``, as timed); exits
    non-zero on a mismatch.

    Two comparisons per aggregator. (1) The update direction of
    ``aggregated_train_step`` (what the train step hands the optimizer), element by
    element, within ``RTOL * |ref| + ATOL * max|ref|`` per variable; the second term
    covers float32 rounding: the loop's one-example forward passes round differently
    from the batch's, which shows in coordinates near zero (observed: <= 5e-7 of the
    maximum). (2) The weight change of one step of Keras's train function of
    ``with_aggregator(...)`` with SGD, ``(before - after) / lr``, against the same
    reference in relative norm.
    """
    keras.utils.set_random_seed(seed)
    base = build(name)
    x, y = random_batch(CHECK_BATCH, seed, name)
    g = loop_per_example_grads(base, x, y)  # of the mean loss: their sum is the gradient
    failed = False
    for spec in specs:
        aggregator = get(spec)
        if aggregator.name == "winsorized":
            ref = [np_winsorized(gi, aggregator.c) for gi in g]
        else:  # m3: the median of the group means, on the scale of the mean gradient
            parts = np.array_split(np.arange(CHECK_BATCH), aggregator.groups)
            ref = [np.median(np.stack([gi[idx].sum(0) * CHECK_BATCH / len(idx) for idx in parts]), 0)
                   for gi in g]
        model = with_aggregator(base, spec)
        model.compile(optimizer=sgd(lr), loss=loss_obj())
        signature = [tf.TensorSpec([None, 28, 28, 1]), tf.TensorSpec([None], tf.int32)] if dynamic else None
        step = tf.function(functools.partial(update_direction, model, aggregator), input_signature=signature)
        out = [t.numpy().astype(np.float64) for t in step(x, y)]
        worst = 0.0
        for o, r in zip(out, ref):  # error in units of the tolerance: ok when <= 1
            tol = RTOL * np.abs(r) + ATOL * np.max(np.abs(r)) + 1e-30
            worst = max(worst, float(np.max(np.abs(o - r) / tol)))
        before = [v.numpy().astype(np.float64) for v in base.trainable_variables]
        data = tf.data.Dataset.from_tensors((x, y))
        if dynamic:
            data = tf.data.Dataset.from_tensor_slices((x, y)).batch(CHECK_BATCH)
        model.make_train_function()(iter(data.repeat()))
        after = [v.numpy().astype(np.float64) for v in base.trainable_variables]
        for v, w in zip(base.trainable_variables, before):  # undo the step
            v.assign(w)
        num = sum(float(np.sum(((b - a) / lr - r) ** 2)) for b, a, r in zip(before, after, ref))
        den = sum(float(np.sum(r ** 2)) for r in ref)
        step_err = (num / den) ** 0.5
        ok = worst <= 1 and step_err <= 10 * RTOL
        failed |= not ok
        print(f"[check {name}] {spec}, batch {CHECK_BATCH}: update direction vs numpy, worst error "
              f"{worst:.2f} x tolerance (rtol {RTOL:g}, atol {ATOL:g} x max); one SGD step of the train "
              f"function, rel. error {step_err:.1e} (tol {10 * RTOL:g}): {'ok' if ok else 'FAIL'}")
    if failed:
        raise SystemExit(f"CHECK FAILED for {name}: an aggregator does not match numpy; "
                         "refusing to time it.")


# ----------------------------------------------------------------------------- timing

def run_model(name, args, seed):
    specs = []
    if "winsorized" in args.methods:
        specs += [f"winsorized:c={c}" for c in args.cs]
    if "m3" in args.methods:
        specs.append("m3:groups=3")
    if not args.no_check:
        check(name, specs, seed + 7, args.lr, args.dynamic_batch)

    keras.utils.set_random_seed(seed)
    b = args.batch_size
    x, y = random_batch(b, seed, name)
    if args.dynamic_batch:
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(b).repeat()
    else:
        data = tf.data.Dataset.from_tensors((x, y)).repeat()

    model = build(name)
    model.compile(optimizer=sgd(args.lr), loss=loss_obj())
    require_rules(model)
    n_params = sum(int(tf.size(v)) for v in model.trainable_variables)
    log(f"[{name}] {n_params:,} parameters")

    methods = [("keras-plain", keras_step(model, data), None)]
    for spec in specs:
        agg_model = with_aggregator(model, spec)
        agg_model.compile(optimizer=sgd(args.lr), loss=loss_obj())
        label = f"winsorized-c{get(spec).c}" if spec.startswith("winsorized") else "m3"
        methods.append((label, keras_step(agg_model, data), "keras-plain"))
        if args.with_top_k and spec.startswith("winsorized"):
            topk_model = with_aggregator(model, spec)
            topk_model.aggregator.use_network = False
            topk_model.compile(optimizer=sgd(args.lr), loss=loss_obj())
            methods.append((label + "-topk", keras_step(topk_model, data), "keras-plain"))
    if "rm3" in args.methods:
        if RunningMedian is None:
            print("RM3: not available (keras_coherence.optimizers.RunningMedian does not exist yet)")
        else:
            rm_model = keras.Model(model.inputs, model.outputs, name=f"{name}_rm3")
            rm_model.compile(optimizer=RunningMedian(sgd(args.lr), window=3), loss=loss_obj())
            methods.append(("rm3", keras_step(rm_model, data), "keras-plain"))
    return _timing.calibrated_rounds(name, methods, args)


def target_of(method, model):
    if method.endswith("-topk"):  # the old path, for comparison
        return None
    family = "winsorized" if method.startswith("winsorized") else method
    return TARGETS.get(family, {}).get(model)


def main(args):
    start = _common.print_header("aggregation overhead benchmark", args)
    rows, md_rows, verdicts = [], [], []
    for name, summary, cpu_summary in _timing.summarize_models(args, run_model):
        for s in summary.values():
            target = target_of(s.name, name)
            c = cpu_summary[s.name]
            rows.append([name, s.name, f"{s.median_ms:.2f}", f"{s.q25_ms:.2f}-{s.q75_ms:.2f}",
                         _timing.ratio_text(s), _timing.ratio_iqr_text(s), f"{c.median_ms:.2f}",
                         _timing.ratio_text(c), "" if target is None else f"<= {target}x"])
            md_ratio = "1" if s.ratio is None else f"**{s.ratio:.2f}x**"
            if target is not None:
                md_ratio += f" (target <= {target}x)"
            md_rows.append([name.upper(), f"`{s.name}`", f"{s.median_ms:.2f}", md_ratio,
                            "1" if c.ratio is None else f"{c.ratio:.2f}x"])
            if s.ratio is not None and target is not None:
                verdicts.append(f"{name}: {s.name} {s.ratio:.2f}x keras-plain (target <= {target}x): "
                                f"{'MET' if s.ratio <= target else 'MISSED'}")

    print()
    print(_timing.text_table(
        ["model", "method", "median ms/step", "IQR ms", "ratio", "ratio IQR", "cpu ms/step",
         "cpu ratio", "target"], rows))
    print()
    for v in verdicts:
        print(v)
    _common.print_load(start)
    print("\nMarkdown (docs/benchmarks.md):\n")
    print(f"Batch {args.batch_size} ({'dynamic' if args.dynamic_batch else 'static'} batch shape), random "
          f"28x28x1 inputs, 10 classes, SGD; TF {tf.__version__} on CPU, {args.threads} thread(s); median "
          f"over {args.rounds} interleaved rounds; ratio = median of the per-round ratios to `keras-plain` "
          "(wall time; CPU ratio: the same in process CPU time).\n")
    print(_timing.markdown_table(["model", "method", "median ms/step", "ratio", "CPU ratio"], md_rows))


if __name__ == "__main__":
    main(ARGS)
