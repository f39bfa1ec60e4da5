"""What does reporting m-coherence on every training step cost?

Compares, interleaved round by round in one process, at batch 128 on random MNIST-shaped
data (28x28x1, 10 classes), for an MLP 784-512-512-10 and a small CNN:

* ``keras-plain``      -- Keras's own train function of the compiled plain model (reference);
* ``keras-coherence``  -- Keras's own train function of ``with_coherence(model)``
  (``CoherenceModel.train_step``: m-coherence and alpha on every step);
* ``bare-plain``       -- a ``tf.function``: forward, compiled sparse CE loss,
  ``tape.gradient``, SGD ``apply_gradients`` (what Keras's default ``train_step`` does,
  without the train-loop machinery);
* ``bare-coherence``   -- a ``tf.function``: ``coherence_train_step`` + ``apply_gradients``;
* ``vmap``             -- per-example gradients by ``tf.vectorized_map``, m-coherence from
  them, and the update: the expensive baseline.

Every method has its own SGD optimizer; all train the same weights. Ratios are the median
over rounds of the per-round ratio to the method's plain counterpart (``keras-*`` to
``keras-plain``, ``bare-*`` and ``vmap`` to ``bare-plain``). Before timing, the
m-coherence of ``keras-coherence`` and ``bare-coherence`` is checked against the one
computed from ``vmap``'s per-example gradients (same weights, same batch).

``--xla`` adds ``jit_compile=True`` variants; ``--profile`` times the components of the
coherence step (traced forward, backward to the pre-activations, rules, statistics).

    .venv/bin/python benchmarks/coherence_overhead.py [--rounds N] [--models mlp,cnn]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if os.path.dirname(_HERE) not in sys.path:  # the package itself, when not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))
import _timing  # noqa: E402

TARGETS = {"mlp": 1.2, "cnn": 1.5}  # keras-coherence / keras-plain
RTOL = 1e-4
MODELS = ("mlp", "cnn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=50,
                   help="timed rounds; every method runs once per round (default 50)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op and inter-op threads (default 1; 0 = TensorFlow's choice)")
    p.add_argument("--target-ms", type=float, default=40.0,
                   help="calls per round are chosen so that each method runs about this long "
                        "per round (at least one call)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method")
    p.add_argument("--no-vmap", action="store_true", help="skip the vectorized_map baseline "
                   "in the timing (it is still used for the correctness check)")
    p.add_argument("--xla", action="store_true", help="also time jit_compile=True variants")
    p.add_argument("--profile", action="store_true",
                   help="also time the components of the coherence step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {MODELS}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


ARGS = parse_args()

# The thread pools are created by the first op: set them before anything else runs.
from keras_coherence._keras import keras, tf  # noqa: E402

try:
    tf.config.threading.set_intra_op_parallelism_threads(ARGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(ARGS.threads)
except RuntimeError as err:  # pragma: no cover - only if an import ran an op
    sys.exit(f"could not set the thread pools ({err}): an op ran before the benchmark set them")

from keras_coherence.coherence.engine import traced_backward  # noqa: E402
from keras_coherence.coherence.registry import rule_for  # noqa: E402
from keras_coherence.coherence.tracing import TracedForward  # noqa: E402
from keras_coherence.coherence.train_step import coherence_train_step, with_coherence  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models

def build(name):
    inputs = keras.Input((28, 28, 1))
    if name == "mlp":
        h = keras.layers.Flatten()(inputs)
        h = keras.layers.Dense(512, activation="relu")(h)
        h = keras.layers.Dense(512, activation="relu")(h)
    else:
        h = keras.layers.Conv2D(32, 3, activation="relu")(inputs)
        h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.Conv2D(64, 3, activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(128, activation="relu")(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs, name=name)


def loss_obj(**kw):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kw)


def sgd():
    return keras.optimizers.SGD(learning_rate=0.01)


def compiled(model, jit_compile=False):
    model.compile(optimizer=sgd(), loss=loss_obj(), jit_compile=jit_compile)
    return model


def require_rules(model):
    """Fail loudly if a layer would take the slow generic fallback: the benchmark would
    then measure the fallback, not the ghost-norm rules."""
    for layer in model.layers:
        if layer.trainable_weights:
            rule, reason = rule_for(layer)
            if rule is None:
                raise SystemExit(f"layer {layer.name} has no coherence rule ({reason})")


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


def keras_step(model, data):
    fn = model.make_train_function()
    iterator = iter(data)
    return lambda: fn(iterator)


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

def fmt_ratio(s):
    return "" if s.ratio is None else f"{s.ratio:.2f}x"


def run_model(name, args, rng_seed):
    keras.utils.set_random_seed(rng_seed)
    b = args.batch_size
    x = tf.random.uniform((b, 28, 28, 1), seed=rng_seed)
    y = tf.random.uniform((b,), maxval=10, dtype=tf.int32, seed=rng_seed + 1)
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
    if args.xla:
        plain_xla = compiled(keras.Model(model.inputs, model.outputs, name=f"{name}_xla"), True)
        coh_xla = compiled(with_coherence(model), True)
        methods += [
            ("keras-plain-xla", keras_step(plain_xla, data), "keras-plain"),
            ("keras-coherence-xla", keras_step(coh_xla, data), "keras-plain-xla"),
            ("bare-plain-xla", lambda f=make_bare_plain(model, True): f(x, y), "bare-plain"),
            ("bare-coherence-xla", lambda f=make_bare_coherence(cmodel, True): f(x, y), "bare-plain-xla"),
        ]
    return run_methods(name, methods, args)


def run_methods(name, methods, args):
    timed = []
    for mname, fn, _ in methods:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            _timing.block(fn())
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        _timing.block(fn())
        one = (time.perf_counter() - t0) * 1e3
        repeat = max(1, round(args.target_ms / max(one, 1e-3)))
        log(f"[{name}] {mname}: warm-up {first:.1f} s, ~{one:.1f} ms/call, {repeat} call(s)/round")
        timed.append(_timing.Method(mname, fn, repeat))
    t0 = time.perf_counter()
    samples = _timing.interleaved(timed, args.rounds, warmup=0)
    log(f"[{name}] {args.rounds} rounds in {time.perf_counter() - t0:.1f} s")
    return samples, {m: ref for m, _, ref in methods if ref is not None}


def main(args):
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    print(f"coherence overhead benchmark: TF {tf.__version__}, tf_keras {keras.__version__}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"intra/inter-op threads {tf.config.threading.get_intra_op_parallelism_threads()}/"
          f"{tf.config.threading.get_inter_op_parallelism_threads()}, batch {args.batch_size}, "
          f"{args.rounds} rounds, load average {load0[0]:.2f}")
    rows, md_rows, verdicts = [], [], []
    for i, name in enumerate(args.models):
        samples, refs = run_model(name, args, args.seed + 100 * i)
        summary = _timing.summarize(samples, refs)
        for s in summary.values():
            spread = "" if s.ratio is None else f"{s.ratio_q25:.2f}-{s.ratio_q75:.2f}"
            rows.append([name, s.name, f"{s.median_ms:.2f}", f"{s.q25_ms:.2f}-{s.q75_ms:.2f}",
                         fmt_ratio(s), s.reference or "", spread])
            md_rows.append([name.upper(), f"`{s.name}`", f"{s.median_ms:.2f}",
                            fmt_ratio(s) + (f" (vs `{s.reference}`)" if s.reference else "")])
        b = summary["keras-coherence"]
        ok = b.ratio <= TARGETS[name]
        verdicts.append(f"{name}: keras-coherence {b.ratio:.2f}x keras-plain "
                        f"(target <= {TARGETS[name]}x): {'MET' if ok else 'MISSED'}; "
                        f"bare-coherence {summary['bare-coherence'].ratio:.2f}x bare-plain")
        if args.profile:
            model = compiled(build(name))
            cmodel = compiled(with_coherence(model))
            keras.utils.set_random_seed(args.seed)
            x = tf.random.uniform((args.batch_size, 28, 28, 1))
            y = tf.random.uniform((args.batch_size,), maxval=10, dtype=tf.int32)
            comps = profile_methods(model, cmodel, x, y)
            methods = [(c, (lambda f=f: f(x, y)), None) for c, f in comps]
            psamples, _ = run_methods(f"{name} profile", methods, args)
            psum = _timing.summarize(psamples, {c: "plain step (+apply)" for c, _ in comps})
            print(f"\nprofile {name} (bare tf.functions, cumulative stages; ratio to the plain step):")
            print(_timing.text_table(
                ["component", "median ms", "IQR ms", "x plain step"],
                [[s.name, f"{s.median_ms:.2f}", f"{s.q25_ms:.2f}-{s.q75_ms:.2f}", fmt_ratio(s)]
                 for s in psum.values()]))

    load1 = os.getloadavg()
    print()
    print(_timing.text_table(
        ["model", "method", "median ms/step", "IQR ms", "ratio", "to", "ratio IQR"], rows))
    print()
    for v in verdicts:
        print(v)
    print(f"\nload average {load0[0]:.2f} at start, {load1[0]:.2f} at end; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print("\nMarkdown (docs/benchmarks.md):\n")
    print(f"Batch {args.batch_size}, random 28x28x1 inputs, 10 classes, SGD; TF {tf.__version__} on CPU, "
          f"{args.threads} thread(s); median over {args.rounds} interleaved rounds; ratio = median "
          "of the per-round ratios.\n")
    print(_timing.markdown_table(["model", "method", "median ms/step", "ratio"], md_rows))


if __name__ == "__main__":
    main(ARGS)
