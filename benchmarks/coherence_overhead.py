"""What does reporting m-coherence on every training step cost?

Compares, interleaved round by round in one process, at batch 128 on random MNIST-shaped
data (28x28x1, 10 classes), for an MLP 784-512-512-10 and a small CNN, and (``--models
transformer``) on 64 random token ids for a 2-block Transformer encoder (embedding 128,
4 heads, feed-forward 512; ``models.text_transformer``):

* ``keras-plain``      -- Keras's own train function of the compiled plain model (reference);
* ``keras-coherence``  -- Keras's own train function of ``with_coherence(model)``
  (``CoherenceModel.train_step``: m-coherence and alpha on every step);
* ``bare-plain``       -- a ``tf.function``: forward, compiled sparse CE loss,
  ``tape.gradient``, SGD ``apply_gradients`` (what Keras's default ``train_step`` does,
  without the train-loop machinery);
* ``bare-coherence``   -- a ``tf.function``: ``coherence_train_step`` + ``apply_gradients``;
* ``vmap``             -- per-example gradients by ``tf.vectorized_map``, m-coherence from
  them, and the update: the expensive baseline;
* ``keras-winsorized-c2`` (``--winsorized``) -- Keras's train function of
  ``with_aggregator(model, "winsorized:c=2")`` (per-example gradients of every weight).

Every method has its own SGD optimizer; all train the same weights. Ratios are the median
over rounds of the per-round ratio to the method's plain counterpart (``keras-*`` to
``keras-plain``, ``bare-*`` and ``vmap`` to ``bare-plain``). Before timing, the
m-coherence of ``keras-coherence`` and ``bare-coherence`` is checked against the one
computed from ``vmap``'s per-example gradients (same weights, same batch).

``--xla`` adds ``jit_compile=True`` variants; ``--profile`` times the components of the
coherence step (traced forward, backward to the pre-activations, rules, statistics).

``--onednn both`` runs the whole benchmark twice, each in its own subprocess, with
TensorFlow's oneDNN kernels on (``TF_ENABLE_ONEDNN_OPTS=1``) and off (``=0``: the
kernels of CPUs without AVX-512, where TensorFlow leaves oneDNN off by default), and
prints the ratios side by side; ``--onednn on``/``off`` runs one setting.

    .venv/bin/python benchmarks/coherence_overhead.py [--rounds N] [--models mlp,cnn]
    .venv/bin/python benchmarks/coherence_overhead.py --models transformer --batch-size 64 --winsorized
    .venv/bin/python benchmarks/coherence_overhead.py --models cnn --no-vmap --onednn both
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if os.path.dirname(_HERE) not in sys.path:  # the package itself, when not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))
import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import _timing  # noqa: E402

TARGETS = {"mlp": 1.2, "cnn": 1.2, "transformer": 1.3}  # keras-coherence / keras-plain
ONEDNN = {"on": "1", "off": "0"}
RTOL = 1e-4


def parse_args(argv=None):
    p = _timing.timing_parser(__doc__, rounds=50)
    p.add_argument("--no-vmap", action="store_true", help="skip the vectorized_map baseline "
                   "in the timing (it is still used for the correctness check)")
    p.add_argument("--xla", action="store_true", help="also time jit_compile=True variants")
    p.add_argument("--winsorized", action="store_true",
                   help="also time Keras's train function of with_aggregator(model, 'winsorized:c=2')")
    p.add_argument("--profile", action="store_true",
                   help="also time the components of the coherence step")
    p.add_argument("--onednn", choices=["default", "on", "off", "both"], default="default",
                   help="TensorFlow's oneDNN kernels: as the CPU decides (default), on, off, or "
                        "both, each in its own subprocess, reported side by side")
    p.add_argument("--json-out", help=argparse.SUPPRESS)  # where a --onednn both child writes
    p.add_argument("--seed", type=int, default=0)
    return _timing.parse_timing_args(p, argv)


def run_both_onednn_settings(argv):
    """``--onednn both``: this script once per setting, each in a fresh process (the
    setting is read when TensorFlow loads), then the ratios side by side."""
    i = argv.index("--onednn") if "--onednn" in argv else None  # "--onednn both" or "--onednn=both"
    base = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--onednn=")]
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ONEDNN:
            out = os.path.join(tmp, f"{setting}.json")
            print(f"\n===== oneDNN {setting} (TF_ENABLE_ONEDNN_OPTS={ONEDNN[setting]}) =====", flush=True)
            rc = subprocess.call([sys.executable, os.path.abspath(__file__), *base,
                                  "--onednn", setting, "--json-out", out])
            if rc != 0:
                raise SystemExit(f"the oneDNN {setting} run failed (exit {rc})")
            with open(out) as f:
                ratios[setting] = json.load(f)
    rows = []
    for model, methods in ratios["on"].items():
        for method, (ms_on, ratio_on, ref) in methods.items():
            ms_off, ratio_off, _ = ratios["off"][model][method]
            rows.append([model, method, f"{ms_on:.2f}", ratio_on or "", f"{ms_off:.2f}", ratio_off or "", ref or ""])
    print("\nSide by side (each setting in its own process; ratio = median per-round ratio to 'to'):")
    print(_timing.text_table(["model", "method", "oneDNN on ms", "ratio", "oneDNN off ms", "ratio", "to"], rows))
    print()
    print(_timing.markdown_table(["model", "method", "vs", "oneDNN on: ms/step", "ratio", "oneDNN off: ms/step", "ratio"],
                                 [[r[0].upper(), f"`{r[1]}`", f"`{r[6]}`" if r[6] else "", *r[2:6]] for r in rows]))


ARGS = parse_args()
if ARGS.onednn == "both":
    run_both_onednn_settings(sys.argv[1:])
    raise SystemExit(0)
if ARGS.onednn in ONEDNN:  # before TensorFlow is imported
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = ONEDNN[ARGS.onednn]

import _common  # noqa: E402  (imports TensorFlow; runs no op)

_common.use_threads(ARGS.threads)  # before anything runs an op

from _common import build, keras, keras_step, loss_obj, random_batch, require_rules, sgd, tf  # noqa: E402
from _timing import log  # noqa: E402
from keras_coherence.aggregation import with_aggregator  # noqa: E402
from keras_coherence.coherence.engine import traced_backward  # noqa: E402
from keras_coherence.coherence.tracing import TracedForward  # noqa: E402
from keras_coherence.coherence.train_step import coherence_train_step, with_coherence  # noqa: E402


# ----------------------------------------------------------------------------- models

def compiled(model, jit_compile=False):
    model.compile(optimizer=sgd(), loss=loss_obj(), jit_compile=jit_compile)
    return model


# ----------------------------------------------------------------------------- steps

def make_bare_plain(model, jit_compile=False):
    opt = sgd()

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def make_bare_coherence(cmodel, jit_compile=False, apply=True):
    opt = sgd()

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        logs, _, grads_and_vars = coherence_train_step(cmodel, (x, y))
        if apply:
            opt.apply_gradients([(g, v) for g, v in grads_and_vars if g is not None])
        return logs["m_coherence"], [g for g, _ in grads_and_vars]

    return step


def per_example_grads(model, x, y):
    """``[B, *var.shape]`` per variable: gradient of each example's own loss."""
    per_example_loss = loss_obj(reduction=keras.losses.Reduction.NONE)

    def one(elems):
        xi, yi = elems
        with tf.GradientTape() as tape:
            logits = model(xi[None], training=True)
            loss = tf.reduce_sum(per_example_loss(yi[None], logits))
        return tape.gradient(loss, model.trainable_variables)

    return tf.vectorized_map(one, (x, y))


def m_coherence_from(per_example):
    sum_grad_sq = tf.add_n([tf.reduce_sum(tf.square(tf.reduce_sum(g, 0))) for g in per_example])
    sum_sq = tf.add_n([tf.reduce_sum(tf.square(g)) for g in per_example])
    return sum_grad_sq / sum_sq


def make_vmap(model, apply=True):
    opt = sgd()

    @tf.function
    def step(x, y):
        per_example = per_example_grads(model, x, y)
        m = m_coherence_from(per_example)
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        mean_grads = [tf.reduce_sum(g, 0) / batch for g in per_example]  # Keras's mean loss
        if apply:
            opt.apply_gradients(zip(mean_grads, model.trainable_variables))
        return m, mean_grads

    return step


# ----------------------------------------------------------------------------- check

def rel_err(a, b):
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-30)


def grads_rel_err(gs, ref):
    num = sum(float(tf.reduce_sum(tf.square(tf.convert_to_tensor(g) - r))) for g, r in zip(gs, ref))
    den = sum(float(tf.reduce_sum(tf.square(r))) for r in ref)
    return (num / den) ** 0.5


def check(name, model, cmodel, x, y, data):
    """m-coherence of (b) == m-coherence from (c)'s per-example gradients, same weights
    and batch; batch gradients agree too. Exits non-zero otherwise."""
    m_ref, g_ref = make_vmap(model, apply=False)(x, y)
    m_bare, g_bare = make_bare_coherence(cmodel, apply=False)(x, y)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x, training=True))
    g_tape = tape.gradient(loss, model.trainable_variables)
    before = [v.numpy() for v in model.trainable_variables]
    logs = cmodel.make_train_function()(iter(data))  # m-coherence at the pre-update weights
    m_keras = logs["m_coherence"].numpy()
    for v, w in zip(model.trainable_variables, before):  # undo that update
        v.assign(w)
    results = {
        "m-coherence keras-coherence vs vmap": rel_err(m_keras, m_ref),
        "m-coherence bare-coherence vs vmap": rel_err(m_bare, m_ref),
        "batch gradient bare-coherence vs tape": grads_rel_err(g_bare, g_tape),
        "batch gradient vmap vs tape": grads_rel_err(g_ref, g_tape),
    }
    print(f"[check {name}] m-coherence: vmap {float(m_ref):.6f}, keras-coherence {float(m_keras):.6f}, "
          f"bare-coherence {float(m_bare):.6f}")
    failed = False
    for what, err in results.items():
        ok = err <= RTOL
        failed |= not ok
        print(f"[check {name}] {what}: rel. error {err:.2e} ({'ok' if ok else 'FAIL'}, tol {RTOL:g})")
    if failed:
        raise SystemExit(f"CHECK FAILED for {name}: the coherence step does not match per-example "
                         "gradients; refusing to time it.")


# ----------------------------------------------------------------------------- profile

def profile_methods(model, cmodel, x, y):
    """Components of the bare coherence step, each a tf.function (cumulative stages)."""
    variables = model.trainable_variables
    opt = sgd()

    @tf.function
    def forward(x, y):
        return model.compute_loss(x, y, model(x, training=True))

    @tf.function
    def fwd_bwd(x, y):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True))
        return tape.gradient(loss, variables)

    @tf.function
    def traced_forward(x, y):
        return cmodel.compute_loss(x, y, TracedForward(cmodel, "train")(x))

    @tf.function
    def traced_cotangents(x, y):  # backward to the watched pre-activations only, no rules
        fwd = TracedForward(cmodel, "train")
        with tf.GradientTape() as tape:
            loss = cmodel.compute_loss(x, y, fwd(x))
        watched = [t for tr in fwd.traces for t in tr.watched]
        return tape.gradient(loss, watched)

    @tf.function
    def rules(x, y):  # + per-layer rules: batch gradients and per-example squared norms
        r = traced_backward(cmodel, x, lambda p: cmodel.compute_loss(x, y, p), "train")
        return list(r.grads.values()), list(r.layer_sq.values())

    @tf.function
    def rules_persistent(x, y):  # same, persistent tape, as coherence_train_step does
        r = traced_backward(cmodel, x, lambda p: cmodel.compute_loss(x, y, p), "train",
                            tape_extra=lambda: None)
        return list(r.grads.values()), list(r.layer_sq.values())

    stats = make_bare_coherence(cmodel, apply=False)  # + m-coherence statistics

    @tf.function
    def grads_and_apply(x, y):  # plain fwd+bwd + apply = bare-plain
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return [
        ("forward+loss", forward),
        ("forward+backward (grads)", fwd_bwd),
        ("plain step (+apply)", grads_and_apply),
        ("traced forward+loss", traced_forward),
        ("traced fwd + bwd to pre-activations", traced_cotangents),
        ("+ rules (grads, per-ex. sq norms)", rules),
        ("+ rules, persistent tape", rules_persistent),
        ("+ m-coherence statistics", stats),
        ("coherence step (+apply)", make_bare_coherence(cmodel)),
    ]


# ----------------------------------------------------------------------------- main

def run_model(name, args, rng_seed):
    keras.utils.set_random_seed(rng_seed)
    x, y = random_batch(args.batch_size, rng_seed, name)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()

    model = compiled(build(name))
    cmodel = compiled(with_coherence(model))
    require_rules(model)
    n_params = sum(int(tf.size(v)) for v in model.trainable_variables)
    log(f"[{name}] {n_params:,} parameters; checking ...")
    check(name, model, cmodel, x, y, data)

    methods = [  # (name, fn, reference)
        ("keras-plain", keras_step(model, data), None),
        ("keras-coherence", keras_step(cmodel, data), "keras-plain"),
        ("bare-plain", lambda f=make_bare_plain(model): f(x, y), "keras-plain"),
        ("bare-coherence", lambda f=make_bare_coherence(cmodel): f(x, y), "bare-plain"),
    ]
    if not args.no_vmap:
        methods.append(("vmap", lambda f=make_vmap(model): f(x, y), "bare-plain"))
    if args.winsorized:
        wmodel = compiled(with_aggregator(model, "winsorized:c=2"))
        methods.append(("keras-winsorized-c2", keras_step(wmodel, data), "keras-plain"))
    if args.xla:
        plain_xla = compiled(keras.Model(model.inputs, model.outputs, name=f"{name}_xla"), True)
        coh_xla = compiled(with_coherence(model), True)
        methods += [
            ("keras-plain-xla", keras_step(plain_xla, data), "keras-plain"),
            ("keras-coherence-xla", keras_step(coh_xla, data), "keras-plain-xla"),
            ("bare-plain-xla", lambda f=make_bare_plain(model, True): f(x, y), "bare-plain"),
            ("bare-coherence-xla", lambda f=make_bare_coherence(cmodel, True): f(x, y), "bare-plain-xla"),
        ]
    return _timing.calibrated_rounds(name, methods, args)


def main(args):
    start = _common.print_header("coherence overhead benchmark", args)
    print(f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset (the CPU decides)')}")
    rows, md_rows, verdicts, summaries = [], [], [], {}
    for name, summary, _ in _timing.summarize_models(args, run_model):
        summaries[name] = summary
        for s in summary.values():
            rows.append([name, s.name, f"{s.median_ms:.2f}", f"{s.q25_ms:.2f}-{s.q75_ms:.2f}",
                         _timing.ratio_text(s), s.reference or "", _timing.ratio_iqr_text(s)])
            md_rows.append([name.upper(), f"`{s.name}`", f"{s.median_ms:.2f}",
                            _timing.ratio_text(s) + (f" (vs `{s.reference}`)" if s.reference else "")])
        b = summary["keras-coherence"]
        ok = b.ratio <= TARGETS[name]
        verdicts.append(f"{name}: keras-coherence {b.ratio:.2f}x keras-plain "
                        f"(target <= {TARGETS[name]}x): {'MET' if ok else 'MISSED'}; "
                        f"bare-coherence {summary['bare-coherence'].ratio:.2f}x bare-plain")
        if args.profile:
            model = compiled(build(name))
            cmodel = compiled(with_coherence(model))
            keras.utils.set_random_seed(args.seed)
            x, y = random_batch(args.batch_size, args.seed, name)
            comps = profile_methods(model, cmodel, x, y)
            methods = [(c, (lambda f=f: f(x, y)), None) for c, f in comps]
            psamples, _, _ = _timing.calibrated_rounds(f"{name} profile", methods, args)
            psum = _timing.summarize(psamples, {c: "plain step (+apply)" for c, _ in comps})
            print(f"\nprofile {name} (bare tf.functions, cumulative stages; ratio to the plain step):")
            print(_timing.text_table(
                ["component", "median ms", "IQR ms", "x plain step"],
                [[s.name, f"{s.median_ms:.2f}", f"{s.q25_ms:.2f}-{s.q75_ms:.2f}", _timing.ratio_text(s)]
                 for s in psum.values()]))

    print()
    print(_timing.text_table(
        ["model", "method", "median ms/step", "IQR ms", "ratio", "to", "ratio IQR"], rows))
    print()
    for v in verdicts:
        print(v)
    _common.print_load(start)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({name: {s.name: [s.median_ms, _timing.ratio_text(s), s.reference] for s in summary.values()}
                       for name, summary in summaries.items()}, f)
    print("\nMarkdown (docs/benchmarks.md):\n")
    print(f"Batch {args.batch_size}, random 28x28x1 inputs (transformer: 64 token ids), 10 classes, SGD; "
          f"TF {tf.__version__} on CPU, "
          f"{args.threads} thread(s); median over {args.rounds} interleaved rounds; ratio = median "
          "of the per-round ratios.\n")
    print(_timing.markdown_table(["model", "method", "median ms/step", "ratio"], md_rows))


if __name__ == "__main__":
    main(ARGS)
