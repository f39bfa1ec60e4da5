"""Measured on-device (LiteRT) training memory of binary networks, next to memory_profile.

For each (model, method, batch) the training model is exported with
``TrainingModule(model, batch_size=B)`` + ``to_training_tflite`` and then run in a **fresh
subprocess that imports only numpy and ai_edge_litert** (this file's ``--child`` mode
never imports TensorFlow or keras_coherence). The child measures, from
``/proc/self/status`` (Linux only), resetting the peak mark (``echo 5 >
/proc/self/clear_refs``) before each phase:

* ``baseline``: RSS after the imports and after the data (one random batch) is made;
* ``load``: RSS and peak growth over ``Interpreter(...)`` + ``allocate_tensors()``;
* ``train``: RSS and peak growth over ``--steps`` ``train`` calls;
* ``interpreter_peak_mib``: the largest RSS over load and training minus the baseline,
  i.e. what the interpreter adds beyond the Python runtime and the data;
* the step time (median of the steps after the first; CPU load moves it, not the memory).

It also lists what the training subgraph's tensors hold, from the file's flatbuffer
(the same shapes ``Interpreter.get_tensor_details`` reports), each tensor in one kind:

* ``constant``: has data in the file (mmapped, not in the arena);
* ``resource_handle``: a ``VAR_HANDLE`` output (no data);
* ``variable_read``: output of ``READ_VARIABLE`` (a copy of a state variable);
* ``saved_for_backward``: computed on the way to the loss and read by a backward op;
* ``forward_temporary``: computed on the way to the loss, read only by forward ops;
* ``backward_weight_shaped``: after the loss, with a state variable's shape (``dW``, the
  Adam arithmetic);
* ``backward_other``: after the loss, any other shape (activation gradients, masks);

* ``kernel_scratch``: tensors a kernel adds when it is prepared, which the file does not
  list (``CONV_2D``'s im2col buffers); one op's are alive at a time, so the largest
  (``kernel_scratch_max_mib``) adds to the arena's peak;

plus ``state`` (the resource variables: ``get_weights``' outputs, outside the arena).
``arena_live_peak`` replays the op order: the largest sum of non-constant tensors alive
at once (a tensor lives from the op writing it to the last op reading it), which is what
an ideal arena planner needs; the tensors alive at that moment are listed too.

    nice -n 19 .venv/bin/python benchmarks/bnn_device_memory.py \\
        [--runs mlp:100,mlp:1000,cnv:8,cnv:100,binarynet:8,binarynet:100] \\
        [--methods standard_device,low_memory] [--steps 3] [--top 12] [--out device_memory.json]
        [--threads N] [--keras-threads N] [--keep-files DIR [--reuse]]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MIB = 2.0 ** 20
_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUNS = "mlp:100,mlp:1000,cnv:8,cnv:100,binarynet:8,binarynet:100"
KINDS = ("constant", "resource_handle", "variable_read", "saved_for_backward", "forward_temporary",
         "backward_weight_shaped", "backward_other", "kernel_scratch")


# ------------------------------------------------------------------ child side (numpy + LiteRT)
def _status_kib(field):
    from edge.runner import status_kib  # numpy-only, like this child

    return status_kib(field, required=True)


def _reset_peak():
    from edge.runner import reset_peak_rss

    reset_peak_rss(required=True)


def _tensor_bytes(shape, dtype):
    import numpy as np

    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _signature_def(model, signature):
    return next(model.SignatureDefs(i) for i in range(model.SignatureDefsLength())
                if model.SignatureDefs(i).SignatureKey().decode() == signature)


def signature_subgraph(flatbuffer, signature="train"):
    """The index of ``signature``'s subgraph in the file: the ``subgraph_index`` of the
    interpreter's ``get_tensor_details`` for that signature's tensors."""
    from ai_edge_litert import schema_py_generated as schema

    return int(_signature_def(schema.Model.GetRootAsModel(flatbuffer, 0), signature).SubgraphIndex())


def tensor_breakdown(flatbuffer, signature="train", output="loss"):
    """Every tensor of ``signature``'s subgraph as ``{index, name, shape, dtype, bytes, kind}``
    (kinds: :data:`KINDS`) plus the live-tensor replay of the op order; numpy and the
    TFLite schema only. Returns ``(tensors, arena)``; ``arena`` holds ``live_peak_bytes``,
    ``live_peak_op`` and ``live_at_peak`` (tensor indices)."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    dtypes = {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}
    numpy_dtype = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "INT64": np.int64,
                   "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_, "INT16": np.int16,
                   "FLOAT64": np.float64, "RESOURCE": None}
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
    sig = _signature_def(model, signature)
    graph = model.Subgraphs(sig.SubgraphIndex())
    loss = next(sig.Outputs(i).TensorIndex() for i in range(sig.OutputsLength())
                if sig.Outputs(i).Name().decode() == output)
    tensors = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        kind = dtypes[t.Type()]
        dtype = numpy_dtype.get(kind)
        shape = [int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else []
        buffer = model.Buffers(t.Buffer())
        constant = buffer is not None and (buffer.DataLength() > 0 or buffer.Size() > 0)
        tensors.append({"index": i, "name": t.Name().decode(), "shape": shape, "dtype": kind.lower(),
                        "bytes": 0 if dtype is None else _tensor_bytes(shape, dtype),
                        "kind": "constant" if constant else ("resource_handle" if dtype is None else None)})
    op_list = []
    for j in range(graph.OperatorsLength()):
        op = graph.Operators(j)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = ops.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        ins = [int(k) for k in op.InputsAsNumpy()] if op.InputsLength() else []
        outs = [int(k) for k in op.OutputsAsNumpy()] if op.OutputsLength() else []
        op_list.append((name, [k for k in ins if k >= 0], outs))
    # forward = the ops the loss depends on (walk producers back from the loss)
    producer = {k: j for j, (_, _, outs) in enumerate(op_list) for k in outs}
    forward_ops, stack = set(), [loss]
    while stack:
        j = producer.get(stack.pop())
        if j is not None and j not in forward_ops:
            forward_ops.add(j)
            stack.extend(op_list[j][1])
    readers = {}
    for j, (_, ins, _) in enumerate(op_list):
        for k in ins:
            readers.setdefault(k, []).append(j)
    state_shapes = set()
    for j, (name, ins, outs) in enumerate(op_list):
        if name == "READ_VARIABLE":
            for k in outs:
                state_shapes.add(tuple(tensors[k]["shape"]))
    for j, (name, ins, outs) in enumerate(op_list):
        for k in outs:
            t = tensors[k]
            if t["kind"] is not None:
                continue
            if name == "READ_VARIABLE":
                t["kind"] = "variable_read"
            elif j in forward_ops:
                backward_reader = any(r not in forward_ops for r in readers.get(k, []))
                t["kind"] = "saved_for_backward" if backward_reader else "forward_temporary"
            else:
                t["kind"] = ("backward_weight_shaped" if tuple(t["shape"]) in state_shapes and t["shape"]
                             else "backward_other")
    for t in tensors:  # the signature's inputs and resource handles
        if t["kind"] is None:
            t["kind"] = "forward_temporary" if t["bytes"] else "constant"
    # liveness replay: a non-constant tensor lives from its producer to its last reader
    last_use = {k: max(r) for k, r in readers.items()}
    first = {k: producer.get(k, -1) for k in range(len(tensors))}
    live, best = {}, (0, -1, [])
    for j in range(-1, len(op_list)):
        for k in (range(len(tensors)) if j == -1 else op_list[j][2]):
            if first[k] == j and tensors[k]["kind"] not in ("constant", "resource_handle"):
                live[k] = tensors[k]["bytes"]
        total = sum(live.values())
        if total > best[0]:
            best = (total, j, sorted(live))
        for k in list(live):
            if last_use.get(k, first[k]) <= j and k != loss:
                del live[k]
    arena = {"live_peak_bytes": best[0], "live_peak_op": best[1],
             "live_peak_op_name": op_list[best[1]][0] if best[1] >= 0 else None,
             "live_at_peak": best[2], "operators": len(op_list)}
    return tensors, arena


def child_measure(model_path, batch_size, steps, xnnpack=False, threads=None):
    """Runs in the subprocess: the memory phases, step times and the tensor breakdown
    (see the module docstring); returns a JSON-able dict."""
    import numpy as np
    from edge.runner import open_interpreter

    with open(model_path, "rb") as f:
        flatbuffer = f.read()  # parsed before the baseline, so the breakdown costs no phase
    tensors, arena = tensor_breakdown(flatbuffer)
    train_subgraph = signature_subgraph(flatbuffer)
    del flatbuffer
    probe = open_interpreter(model_path)  # shapes only; freed before the baseline
    spec = probe.get_signature_runner("train").get_input_details()
    infer_out = probe.get_signature_runner("infer").get_output_details()["logits"]["shape_signature"]
    state = probe.get_signature_runner("get_weights").get_output_details()
    state_bytes = sum(_tensor_bytes(v["shape"], v["dtype"]) for v in state.values())
    del probe
    rng = np.random.default_rng(0)
    x_shape = [batch_size] + [int(d) for d in spec["x"]["shape_signature"][1:]]
    x = rng.uniform(-1, 1, size=x_shape).astype(spec["x"]["dtype"])
    y = rng.integers(0, int(infer_out[-1]), size=batch_size).astype(spec["y"]["dtype"])
    out = {"data_bytes": int(x.nbytes + y.nbytes), "state_bytes": state_bytes}
    out["baseline_rss_kib"] = _status_kib("VmRSS")
    file_pages_before = _status_kib("RssFile")
    _reset_peak()
    interpreter = open_interpreter(model_path, threads, xnnpack)  # as python -m edge runs it
    interpreter.allocate_tensors()
    train = interpreter.get_signature_runner("train")
    out["load_rss_kib"], out["load_hwm_kib"] = _status_kib("VmRSS"), _status_kib("VmHWM")
    _reset_peak()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(float(train(x=x, y=y)["loss"]))
        times.append(time.perf_counter() - t0)
    out["train_rss_kib"], out["train_hwm_kib"] = _status_kib("VmRSS"), _status_kib("VmHWM")
    # clean pages of the mmapped model file (the init subgraph's initial values) count in
    # RSS but are not heap: the kernel can drop them
    out["file_pages_mib"] = (_status_kib("RssFile") - file_pages_before) / 1024.0
    base = out["baseline_rss_kib"]
    out["interpreter_peak_mib"] = (max(out["load_hwm_kib"], out["train_hwm_kib"]) - base) / 1024.0
    out["load_peak_mib"] = (out["load_hwm_kib"] - base) / 1024.0
    out["train_peak_over_load_mib"] = (out["train_hwm_kib"] - out["load_rss_kib"]) / 1024.0
    out["step_ms"] = float(np.median(times[1:] if len(times) > 1 else times)) * 1e3
    out["first_step_ms"] = times[0] * 1e3
    out["losses"] = losses
    # the interpreter's own view of the shapes, to cross-check the flatbuffer's
    details = interpreter.get_tensor_details(train_subgraph)
    out["interpreter_tensor_bytes"] = {int(d["index"]): _tensor_bytes(d["shape"], d["dtype"])
                                       for d in details}
    # tensors the kernels add at prepare time (CONV_2D's im2col buffers): not in the file
    for d in details:
        if int(d["index"]) >= len(tensors):
            tensors.append({"index": int(d["index"]), "name": d["name"] or "(kernel temporary)",
                            "shape": [int(n) for n in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                            "bytes": _tensor_bytes(d["shape"], d["dtype"]), "kind": "kernel_scratch"})
    out["tensors"] = tensors
    out["arena"] = arena
    out["imported_tensorflow"] = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
    out["imported_keras_coherence"] = any(m.split(".")[0] == "keras_coherence" for m in sys.modules)
    return out


def run_child(model_path, batch_size, steps=3, python=None, timeout=1800, env=None, xnnpack=False,
              threads=None):
    """:func:`child_measure` in a fresh ``python`` process (numpy + LiteRT only; ``env``:
    its environment, default this one's)."""
    cmd = [python or sys.executable, os.path.abspath(__file__), "--child", model_path, str(batch_size),
           str(steps)] + (["--xnnpack"] if xnnpack else []) + ([f"--threads={threads}"] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(measured, top=12):
    """Totals by kind (MiB), the largest tensors and those alive at the arena's peak."""
    tensors = measured["tensors"]
    totals = {k: sum(t["bytes"] for t in tensors if t["kind"] == k) / MIB for k in KINDS}
    totals["state"] = measured["state_bytes"] / MIB
    live = set(measured["arena"]["live_at_peak"])
    def row(t):
        return {"name": t["name"][:80], "shape": t["shape"], "dtype": t["dtype"], "kind": t["kind"],
                "mib": t["bytes"] / MIB}
    nonconst = sorted((t for t in tensors if t["kind"] != "constant"), key=lambda t: -t["bytes"])
    live_rows = sorted((t for t in tensors if t["index"] in live), key=lambda t: -t["bytes"])
    live_by_kind = {k: sum(t["bytes"] for t in live_rows if t["kind"] == k) / MIB for k in KINDS}
    scratch = [t["bytes"] for t in tensors if t["kind"] == "kernel_scratch"]
    return {"totals_mib": totals, "largest": [row(t) for t in nonconst[:top]],
            "kernel_scratch_max_mib": max(scratch, default=0) / MIB,
            "live_peak_mib": measured["arena"]["live_peak_bytes"] / MIB,
            "live_peak_by_kind_mib": live_by_kind, "live_at_peak_largest": [row(t) for t in live_rows[:top]]}


# ------------------------------------------------------------------ parent side (TensorFlow)
def export(model_name, method, batch_size, path):
    """Writes the training model; returns None, or why it does not lower (a string)."""
    from keras_coherence import keras
    from keras_coherence.binary import export_training
    from keras_coherence.binary.models import build_binary_model

    keras.utils.set_random_seed(0)
    model = build_binary_model(model_name, method)
    try:
        flatbuffer = export_training.to_training_tflite(export_training.TrainingModule(model, batch_size=batch_size))
    except ValueError as err:
        return " ".join(str(err).split())[:400]
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return None


def parse_methods(text):
    """``--methods``' comma-separated names, each checked (exits with the reason)."""
    from keras_coherence.binary.config import resolve_method

    methods = text.split(",")
    for method in methods:
        try:
            resolve_method(method)
        except ValueError as err:
            raise SystemExit(f"--methods: {err}") from err
    return methods


def keras_model(model_name, method):
    """The model the export starts from, compiled as the exported training step trains
    (Adam 1e-3, sparse cross-entropy from logits): the Keras step-time reference."""
    from keras_coherence import keras
    from keras_coherence.binary.models import build_binary_model

    keras.utils.set_random_seed(0)
    model = build_binary_model(model_name, method)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def keras_step_ms(model_name, method, batch_size, steps):
    """Median ``train_on_batch`` time (ms) of the same model in Keras (Adam, from logits)
    on one random batch, steps after the first; the reference for the LiteRT step time."""
    import numpy as np

    model = keras_model(model_name, method)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch_size,) + tuple(model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, int(model.output_shape[-1]), size=batch_size).astype(np.int32)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:])) * 1e3


def modelled(model_name, method, batch_size):
    from keras_coherence.binary.memory import memory_profile

    paper = memory_profile(model_name, batch_size=batch_size, method=method)
    device = memory_profile(model_name, batch_size=batch_size, method=method, layout="device")
    return {"peak_mib": device.peak_mib, "paper_peak_mib": paper.peak_mib,
            "columns_mib": {k: v / 8 / MIB for k, v in device.totals().items()},
            "paper_columns_mib": {k: v / 8 / MIB for k, v in paper.totals().items()}}


def _table(results):
    head = ("model", "method", "batch", "file MB", "interp. peak MiB", "load MiB", "train+ MiB", "file pages MiB",
            "step ms", "Keras step ms", "arena live peak MiB", "largest scratch MiB", "state MiB",
            "modelled (device) MiB", "modelled/measured", "paper layout MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("does_not_lower"):
            lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | does not lower: {r['does_not_lower']} |")
            continue
        m = r["measured"]
        lines.append("| " + " | ".join(str(v) for v in (
            r["model"], r["method"], r["batch"], f"{r['file_bytes'] / 1e6:.1f}", f"{m['interpreter_peak_mib']:.1f}",
            f"{m['load_peak_mib']:.1f}", f"{m['train_peak_over_load_mib']:.1f}", f"{m['file_pages_mib']:.1f}",
            f"{m['step_ms']:.1f}", f"{r['keras_step_ms']:.1f}" if "keras_step_ms" in r else "",
            f"{r['summary']['live_peak_mib']:.1f}", f"{r['summary']['kernel_scratch_max_mib']:.1f}",
            f"{r['summary']['totals_mib']['state']:.1f}",
            f"{r['modelled']['peak_mib']:.2f}", f"{r['modelled']['peak_mib'] / m['interpreter_peak_mib']:.3f}",
            f"{r['modelled']['paper_peak_mib']:.2f}"))
            + " |")
    return "\n".join(lines)


def _ratios(results, baseline="standard_device"):
    """Lines ``model batch: baseline / method`` of the interpreter peaks (and modelled)."""
    peaks = {(r["model"], r["batch"], r["method"]): r for r in results if r.get("measured")}
    lines = []
    for (model, batch, method), r in peaks.items():
        base = peaks.get((model, batch, baseline))
        if base is None or method == baseline:
            continue
        measured = base["measured"]["interpreter_peak_mib"] / r["measured"]["interpreter_peak_mib"]
        modelled = base["modelled"]["peak_mib"] / r["modelled"]["peak_mib"]
        paper = base["modelled"]["paper_peak_mib"] / r["modelled"]["paper_peak_mib"]
        lines.append(f"{model} batch {batch}: {baseline} / {method} = {measured:.2f}x measured "
                     f"(device layout modelled {modelled:.2f}x, paper layout {paper:.2f}x)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated model:batch pairs")
    p.add_argument("--methods", default="standard_device,low_memory")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="largest tensors listed per run")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--keep-files", help="keep the .tflite files in this directory")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras step-time reference")
    p.add_argument("--xnnpack", action="store_true", help="run LiteRT with its XNNPACK delegate")
    p.add_argument("--threads", type=int, help="LiteRT interpreter threads (default: LiteRT's choice)")
    p.add_argument("--keras-threads", type=int, default=0,
                   help="TensorFlow's intra- and inter-op threads for the Keras step (0: its choice)")
    p.add_argument("--reuse", action="store_true",
                   help="measure the files already in --keep-files instead of exporting them again")
    p.add_argument("--child", nargs=3, metavar=("MODEL_PATH", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the step time is the median after the first)")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.keras_threads < 0:
        p.error("--keras-threads must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(_HERE))  # the packages themselves, when not pip-installed
    if args.child:
        print(json.dumps(child_measure(args.child[0], int(args.child[1]), int(args.child[2]), args.xnnpack,
                                       args.threads)))
        return 0
    runs = []
    for item in args.runs.split(","):
        name, _, batch = item.partition(":")
        if not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"--runs: {item!r} is not model:batch (e.g. cnv:100)")
        runs.append((name, int(batch)))
    from keras_coherence.binary.models import MODEL_NAMES

    from _common import use_threads

    use_threads(args.keras_threads)  # before TensorFlow runs its first op

    unknown = sorted({name for name, _ in runs} - set(MODEL_NAMES))
    if unknown:
        raise SystemExit(f"--runs: unknown model(s) {unknown}; known: {', '.join(MODEL_NAMES)}")
    methods = parse_methods(args.methods)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep_files or tmp
        os.makedirs(folder, exist_ok=True)
        for name, batch in runs:
            for method in methods:
                path = os.path.join(folder, f"{name}_{method}_{batch}.tflite")
                t0 = time.perf_counter()
                reused = args.reuse and args.keep_files and os.path.isfile(path)
                why = None if reused else export(name, method, batch, path)
                row = {"model": name, "method": method, "batch": batch, "does_not_lower": why,
                       "litert_threads": args.threads, "keras_threads": args.keras_threads or None,
                       "modelled": modelled(name, method, batch), "convert_s": time.perf_counter() - t0}
                if why is None:
                    row["file_bytes"] = os.path.getsize(path)
                    measured = run_child(path, batch, args.steps, xnnpack=args.xnnpack, threads=args.threads)
                    row["summary"] = summarize(measured, args.top)
                    measured.pop("interpreter_tensor_bytes")
                    row["measured"] = {k: v for k, v in measured.items() if k not in ("tensors", "arena")}
                    row["arena"] = {k: v for k, v in measured["arena"].items() if k != "live_at_peak"}
                    if not args.no_keras:
                        row["keras_step_ms"] = keras_step_ms(name, method, batch, args.steps)
                print(json.dumps({k: row[k] for k in ("model", "method", "batch", "does_not_lower")}
                                 | ({"interpreter_peak_mib": row["measured"]["interpreter_peak_mib"],
                                     "step_ms": row["measured"]["step_ms"],
                                     "modelled_mib": row["modelled"]["peak_mib"]} if why is None else {})),
                      flush=True)
                results.append(row)
    print(_table(results))
    print(_ratios(results))
    for r in results:
        if r.get("summary"):
            s = r["summary"]
            print(f"\n{r['model']} {r['method']} batch {r['batch']}: totals MiB " +
                  ", ".join(f"{k} {v:.1f}" for k, v in s["totals_mib"].items()) +
                  f"; live at the arena peak {s['live_peak_mib']:.1f} MiB: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in s["live_peak_by_kind_mib"].items() if v))
            for t in s["live_at_peak_largest"]:
                print(f"    {t['mib']:9.2f} MiB  {t['kind']:<22} {t['dtype']:<8} {t['shape']}  {t['name']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
