"""Short, CPU-friendly runs of every workflow on the offline embedded MNIST (what
``make demo`` runs), one section per workflow.

Each section is a function registered with :func:`section`; its preset configuration
is in :data:`PRESETS` (tests shrink them there). ``run`` returns a summary whose
``sections`` list holds each section's one-line result and seconds.

>>> from keras_coherence.workflows import demo
>>> summary = demo.run(demo.Config(only=("coherence",)), "runs/demo")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, Optional, Tuple

from keras_coherence.workflows import _common as c
from keras_coherence.workflows import aggregate, bnn, coherence, quantize

__all__ = ["AggregationDemo", "Config", "PRESETS", "SECTIONS", "run", "section"]

HELP = "short runs of every job on the embedded MNIST (what `make demo` runs)"


@dataclasses.dataclass
class AggregationDemo:
    """The aggregation section: one ``aggregate`` run per arm, on shared settings."""

    aggregators: Tuple[str, ...]
    base: aggregate.Config


#: Each section's configuration (its seed and quiet come from the demo's Config).
PRESETS: Dict[str, object] = {
    # 5 epochs x 80 steps of SGD on the 4,000 embedded training images, 51 measurements
    # on a 512-example probe: about 15 s on 2 CPU cores.
    "coherence": coherence.Config(model="mlp", lr=0.1, epochs=5, batch_size=50, probe_size=512, every_n_steps=8),
    # 300 embedded training images, half of them with a wrong label; 40 epochs of each arm
    # (SGD lr 0.1, batch 100) on a 784-64-64-10 MLP. About 60 s on 2 busy CPU cores, most of
    # it the winsorized arm. Over 40 epochs SGD starts fitting the wrong labels; winsorizing
    # (c=8) slows that.
    "aggregation": AggregationDemo(("sgd", "winsorized:c=8", "rm3"), aggregate.Config(
        max_train=300, epochs=40, label_noise=0.5, hidden=(64, 64), batch_size=100, lr=0.1, quiet=True)),
    # A 784-64-10 MLP on 2,000 embedded training images: 3 float epochs, 1 QAT epoch with
    # 4-bit MSQE PO2 weights (ScaleMonitor on every step), integer TFLite export. About
    # 15-20 s on 2 CPU cores, a third of it the TFLite conversion.
    "quantization": quantize.Config(model="mlp", hidden=(64,), max_train=2000, float_epochs=3, qat_epochs=1,
                                    bits=4, method="msqe", batch_size=50, quiet=True),
    # The paper's 784-256x4-10 binary MLP, low-memory method, 3 epochs of Adam on 2,000
    # embedded training images; LCE and training exports and 3 on-device steps in LiteRT.
    # About 30 s on 2 CPU cores, most of it the two TFLite conversions.
    "bnn": bnn.Config(model="mlp", method="low_memory", max_train=2000, epochs=3, batch_size=100,
                      device_steps=3, quiet=True),
}

#: ``name -> (title, run(preset, out_dir, log) -> one-line result)``, in running order.
SECTIONS: Dict[str, Tuple[str, Callable]] = {}


def section(name: str, title: str):
    """Register ``run(preset, out_dir, log) -> one-line result`` as a demo section; it
    writes into ``<out>/<name>/`` and should take well under a minute on 2 CPU cores."""
    def register(fn):
        if name in SECTIONS:
            raise ValueError(f"demo section {name!r} is registered twice")
        SECTIONS[name] = (title, fn)
        return fn
    return register


@dataclasses.dataclass
class Config:
    """Short, CPU-friendly runs of the library's jobs on the offline embedded MNIST."""

    only: Optional[Tuple[str, ...]] = c.option(None, "run only this section (repeatable)", metavar="SECTION",
                                               action="append")
    seed: int = c.option(0, "random seed", check=int)
    quiet: bool = c.option(False, "no progress bars")

    def __post_init__(self):
        if self.only is not None:
            self.only = tuple(self.only)
            unknown = [s for s in self.only if s not in SECTIONS]
            if unknown:
                raise c.ConfigError(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}.")
        c.check_config(self)


def _with(preset, config: Config, **extra):
    return dataclasses.replace(preset, seed=config.seed, **extra)


@section("coherence", "m-coherence while an MLP learns the embedded MNIST")
def _coherence(config, out_dir, log):
    s = coherence.run(_with(PRESETS["coherence"], config, quiet=config.quiet), out_dir, log=log(False))
    mc = s["m_coherence"]
    return (f"m-coherence {mc['first']['value']:.3g} -> peak {mc['peak']['value']:.3g} -> "
            f"{mc['last']['value']:.3g}; test accuracy {s['accuracy']['test']:.3f}")


@section("aggregation", "SGD vs winsorized (c=8) vs RM3 on 50% noisy labels")
def _aggregation(config, out_dir, log):
    from keras_coherence.workflows.experiments import plot_accuracy_panels, read_rows

    preset = PRESETS["aggregation"]
    runs, lines = {}, []
    for spec in preset.aggregators:
        arm = aggregate.parse_aggregator(spec, preset.base.batch_size)
        arm_dir = os.path.join(out_dir, arm.spec.replace(":", "_").replace("=", ""))  # e.g. winsorized_c8
        s = aggregate.run(_with(preset.base, config, aggregator=spec), arm_dir, log=log(config.quiet))
        runs[arm.label] = read_rows(os.path.join(arm_dir, "aggregate.csv"))
        f = s["accuracy"]["final"]
        lines.append(f"{arm.label} corrupt {f['corrupt']:.2f} test {f['test']:.2f}")
    base = preset.base
    plot_accuracy_panels(
        runs, os.path.join(out_dir, "aggregation.png"),
        [("pristine_accuracy", "pristine training examples"),
         ("corrupt_accuracy", "corrupt examples, noisy labels"), ("test_accuracy", "test set")],
        chance=0.1, title=f"{base.label_noise:.0%} label noise, {base.max_train} embedded MNIST images, MLP "
                          f"{'-'.join(map(str, (784, *base.hidden, 10)))}, SGD lr {base.lr}, batch {base.batch_size}")
    return "; ".join(lines)


@section("quantization", "4-bit power-of-two weights: float -> QAT -> integer TFLite")
def _quantization(config, out_dir, log):
    s = quantize.run(_with(PRESETS["quantization"], config), out_dir, log=log(config.quiet))
    acc, lite = s["accuracy"], s["tflite"]
    return (f"test accuracy float {acc['float']:.3f}, {s['quantization']['bits']}-bit Keras "
            f"{acc['quantized_keras']:.3f}, TFLite {acc['tflite']:.3f}; PO2 scales "
            f"{'all exact' if lite['all_scales_po2'] else 'NOT all exact'}; {s['scales']['flips']} exponent flips")


@section("bnn", "binary MLP trained low-memory, exported for LCE and on-device training")
def _bnn(config, out_dir, log):
    s = bnn.run(_with(PRESETS["bnn"], config), out_dir, log=log(config.quiet))
    losses = s["device"].get("losses")
    trend = (f"device loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps" if losses
             else "no on-device training model")
    return (f"test accuracy {s['accuracy']['test']:.3f} (LCE {s['accuracy']['lce_test']:.3f}); modelled memory "
            f"{s['memory']['ratio']:.2f}x below standard; LCE file {s['lce']['size_ratio']:.2f}x the float "
            f"TFLite; {trend}")


def run(config: Config, out_dir: str, log: Callable[[str], None] = print) -> c.Summary:
    """Run the sections (``config.only``, or all) into ``out_dir/<section>/``; ``log``
    gets the section headers and the workflows' lines (not with ``quiet``, except the
    coherence section's). Returns ``{"sections": [{"name", "result", "seconds"}], "seconds"}``."""
    start = time.perf_counter()
    names = [s for s in SECTIONS if config.only is None or s in config.only]
    results = []
    for i, name in enumerate(names, 1):
        title, fn = SECTIONS[name]
        log(f"\n[{i}/{len(names)}] {name}: {title}")
        t0 = time.perf_counter()
        line = fn(config, os.path.join(out_dir, name), lambda quiet: (lambda text: None) if quiet else log)
        results.append({"name": name, "result": line, "seconds": time.perf_counter() - t0})
    return c.Summary(command="demo", sections=results, seconds=time.perf_counter() - start)
