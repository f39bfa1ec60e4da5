"""Small timing helpers shared by the benchmarks.

Machines are noisy (other processes, frequency scaling, caches), so the benchmarks
never time one method after another in separate blocks. :func:`interleaved` runs every
method once per *round*, in an order that rotates from round to round, and keeps one
number per method per round; :func:`summarize` reports medians and, for ratios, the
median of the *per-round* ratios (paired samples: both methods ran within the same
fraction of a second, so slow phases of the machine cancel out).

Nothing here imports TensorFlow: a method is any zero-argument callable, and
:func:`block` waits on what it returns (anything with ``.numpy()`` is fetched).
:func:`timing_parser`, :func:`parse_timing_args` and :func:`calibrated_rounds` are the
command line and the timing protocol of the overhead benchmarks (``coherence_overhead.py``,
``aggregation_overhead.py``); they too run before TensorFlow is imported, so ``--help``
answers at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence


def block(result):
    """Wait until ``result`` is computed: fetch the first tensor-like leaf (an
    asynchronous runtime returns before it has finished; fetching one output of a
    step waits for the step)."""
    stack = [result]
    while stack:
        item = stack.pop()
        if hasattr(item, "numpy"):
            item.numpy()
            return
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


@dataclasses.dataclass
class Method:
    """``fn`` is called ``repeat`` times per round; the round's number for the method
    is the mean time of one call, in milliseconds."""

    name: str
    fn: Callable[[], object]
    repeat: int = 1


def interleaved(methods: Sequence[Method], rounds: int, warmup: int = 2,
                progress: Optional[Callable[[int], None]] = None,
                cpu: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Time ``methods`` round by round; returns name -> per-round ms per call.

    Round ``r`` runs the methods starting at index ``r mod n`` (so each method runs
    first, second, ... equally often). ``warmup`` untimed calls of each method come
    first (tracing, allocator growth). The garbage collector is off while timing and
    runs between rounds.

    ``cpu``, when given, is filled the same way with the process's CPU time (all its
    threads) per call: on a machine shared with other jobs, waiting for a core inflates
    wall time but not CPU time.
    """
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique: {names}")
    for m in methods:
        for _ in range(warmup):
            block(m.fn())
    samples: Dict[str, List[float]] = {m.name: [] for m in methods}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            gc.collect()
            gc.disable()
            start = r % len(methods)
            for m in list(methods[start:]) + list(methods[:start]):
                c0 = time.process_time()
                t0 = time.perf_counter()
                for _ in range(m.repeat):
                    block(m.fn())
                samples[m.name].append((time.perf_counter() - t0) * 1e3 / m.repeat)
                if cpu is not None:
                    cpu.setdefault(m.name, []).append((time.process_time() - c0) * 1e3 / m.repeat)
            if gc_was_enabled:
                gc.enable()
            if progress is not None:
                progress(r)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (``q`` in [0, 1])."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclasses.dataclass
class Summary:
    name: str
    median_ms: float
    q25_ms: float
    q75_ms: float
    ratio: Optional[float] = None  # median over rounds of (this / reference)
    ratio_q25: Optional[float] = None
    ratio_q75: Optional[float] = None
    reference: Optional[str] = None


def summarize(samples: Mapping[str, Sequence[float]],
              reference: Optional[Mapping[str, str]] = None) -> Dict[str, Summary]:
    """Medians and quartiles per method; ``reference`` maps a method to the method
    its ratio is taken against (paired per round)."""
    reference = reference or {}
    out = {}
    for name, values in samples.items():
        s = Summary(name, statistics.median(values), quantile(values, 0.25), quantile(values, 0.75))
        ref = reference.get(name)
        if ref is not None:
            ratios = [a / b for a, b in zip(values, samples[ref])]
            s.ratio = statistics.median(ratios)
            s.ratio_q25, s.ratio_q75 = quantile(ratios, 0.25), quantile(ratios, 0.75)
            s.reference = ref
        out[name] = s
    return out


def ratio_text(s: Summary) -> str:
    """The median ratio as ``"1.23x"``; ``""`` for a method without a reference."""
    return "" if s.ratio is None else f"{s.ratio:.2f}x"


def ratio_iqr_text(s: Summary) -> str:
    """The ratio's interquartile range as ``"1.10-1.35"``; ``""`` without a reference."""
    return "" if s.ratio is None else f"{s.ratio_q25:.2f}-{s.ratio_q75:.2f}"


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False


# ----------------------------------------------------------------------------- overhead benchmarks

MODELS = ("mlp", "cnn", "transformer")
DEFAULT_MODELS = ("mlp", "cnn")


def log(msg):
    """Progress on stderr: stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def timing_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The options every overhead benchmark takes; the script adds its own (and
    ``--seed``, listed last), then calls :func:`parse_timing_args`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=rounds,
                   help=f"timed rounds; every method runs once per round (default {rounds})")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op and inter-op threads (default 1; 0 = TensorFlow's choice)")
    p.add_argument("--target-ms", type=float, default=40.0,
                   help="calls per round are chosen so that each method runs about this long "
                        "per round (at least one call)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method")
    return p


def parse_timing_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, turn ``--models`` into a list and reject unknown models and ``--rounds < 1``."""
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {MODELS}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def calibrated_rounds(label: str, methods, args):
    """Time ``methods``, ``(name, fn, reference)`` triples, as :func:`interleaved` does.

    Each method first runs ``args.warmup`` untimed calls and one timed call, which sets
    its calls per round so that a round of it lasts about ``args.target_ms``; then
    ``args.rounds`` interleaved rounds. Returns wall-time samples, CPU-time samples
    (see :func:`interleaved`) and name -> reference for :func:`summarize`.
    """
    timed = []
    for name, fn, _ in methods:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            block(fn())
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        block(fn())
        one = (time.perf_counter() - t0) * 1e3
        repeat = max(1, round(args.target_ms / max(one, 1e-3)))
        log(f"[{label}] {name}: warm-up {first:.1f} s, ~{one:.1f} ms/call, {repeat} call(s)/round")
        timed.append(Method(name, fn, repeat))
    t0 = time.perf_counter()
    cpu: Dict[str, List[float]] = {}
    samples = interleaved(timed, args.rounds, warmup=0, cpu=cpu)
    log(f"[{label}] {args.rounds} rounds in {time.perf_counter() - t0:.1f} s")
    return samples, cpu, {name: ref for name, _, ref in methods if ref is not None}


def summarize_models(args, run_model):
    """For each of ``args.models``: ``(name, wall summary, CPU summary)`` of
    ``run_model(name, args, seed)``, which returns what :func:`calibrated_rounds` does;
    model ``i`` gets seed ``args.seed + 100 * i``."""
    for i, name in enumerate(args.models):
        samples, cpu, refs = run_model(name, args, args.seed + 100 * i)
        yield name, summarize(samples, refs), summarize(cpu, refs)
