"""Small timing helpers shared by the benchmarks.

Machines are noisy (other processes, frequency scaling, caches), so the benchmarks
never time one method after another in separate blocks. :func:`interleaved` runs every
method once per *round*, in an order that rotates from round to round, and keeps one
number per method per round; :func:`summarize` reports medians and, for ratios, the
median of the *per-round* ratios (paired samples: both methods ran within the same
fraction of a second, so slow phases of the machine cancel out).

Nothing here imports TensorFlow: a method is any zero-argument callable, and
:func:`block` waits on what it returns (anything with ``.numpy()`` is fetched).
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
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
