"""One quantization run, measured: QAT from a float model, integer export, accuracies.

``qat_evaluate(float_model, train, test, method=...)`` is what the ``quantize`` CLI
command and ``benchmarks/quantization_methods.py`` both run for each method:

1. a QAT copy of ``float_model`` (``quantize_model`` with PO2 weights, or tfmot's
   default 8-bit scheme for ``method="tfmot8"``), activation ranges calibrated on a
   few training images;
2. ``qat_epochs`` of training with a ``ScaleMonitor`` (PO2 methods) and, with
   ``stable_switch_epoch``, the stable exponents switched on after that epoch
   (``switch_to_stable_exponents``);
3. integer TFLite export (``to_integer_tflite``) and the test accuracy of the float, the
   quantized Keras and the TFLite model, their top-1 agreement, the median QAT step
   time and the exported scales' report (``tflite_scale_report``).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Dict, Optional, Sequence

import numpy as np

from keras_coherence._keras import keras, tf

__all__ = ["qat_evaluate", "tflite_scale_report", "StepTimer", "switch_to_stable_exponents"]


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training batch (``times``, seconds); ``median_ms()``."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)

    def median_ms(self, skip: int = 1) -> float:
        """Median batch time in ms, skipping the first ``skip`` (graph tracing)."""
        times = self.times[skip:] or self.times
        return float(np.median(times) * 1e3) if times else float("nan")


def switch_to_stable_exponents(model) -> int:
    """Switches every ``MSQEPo2(stable_exponent=True)`` kernel quantizer of a QAT model to
    its rounded stable (EMA) exponent; returns how many were switched."""
    from keras_coherence.quantization.qat import quantized_kernels
    from keras_coherence.quantization.quantizers import MSQEPo2

    count = 0
    for k in quantized_kernels(model):
        inner = k.quantizer.quantizer
        if isinstance(inner, MSQEPo2) and inner.stable_exponent:
            inner.switch_to_stable_exponent(k.state)
            count += 1
    return count


def tflite_scale_report(tflite_model) -> Dict[str, Any]:
    """Whether every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED weight tensor of a
    TFLite model has exact power-of-two scales and zero points 0, read back with LiteRT."""
    from keras_coherence.quantization.export import tflite_kernels

    kernels = tflite_kernels(tflite_model)
    po2 = [k["scales"].size > 0 and bool(np.all(np.frexp(k["scales"])[0] == 0.5)) for k in kernels]
    return {
        "weight_tensors": len(kernels),
        "po2_tensors": int(sum(po2)),
        "all_scales_po2": bool(kernels) and all(po2),
        "zero_points_zero": all(bool(np.all(k["zero_points"] == 0)) for k in kernels),
        "max_abs_weight_code": max((int(np.abs(k["values"].astype(np.int64)).max()) for k in kernels), default=0),
    }


def _logit_steps(keras_logits, lite_logits, step):
    """``|Keras - LiteRT|`` logits in output int8 steps: the parity beyond top-1."""
    if not step:
        return None
    steps = np.abs(keras_logits - lite_logits) / step
    return {"max": float(steps.max()), "p99": float(np.percentile(steps, 99)), "mean": float(steps.mean()),
            "within_1": float(np.mean(steps <= 1.0 + 1e-3))}


def _tfmot8(float_model):
    import tensorflow_model_optimization as tfmot

    return tfmot.quantization.keras.quantize_model(float_model)


def _tfmot8_tflite(qmodel):
    converter = tf.lite.TFLiteConverter.from_keras_model(qmodel)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected": QAT has them
        warnings.simplefilter("ignore", UserWarning)
        return converter.convert()


def qat_evaluate(float_model, train, test, method: str = "msqe", bits: int = 4, per_channel: bool = True,
                 quantizer_options: Optional[Dict[str, Any]] = None, qat_epochs: int = 1,
                 optimizer=None, batch_size: int = 64, every_n_steps: int = 1,
                 stable_switch_epoch: Optional[int] = None, calibration_examples: int = 512,
                 callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int = 0) -> Dict[str, Any]:
    """QAT, export and evaluate one quantization ``method`` on a trained ``float_model``.

    Args:
        float_model: a trained float Keras model (not modified).
        train, test: ``(x, y)`` arrays, integer labels; the loss is sparse categorical
            cross-entropy on logits.
        method: ``"msqe_baseline"``, ``"msqe"``, ``"learned"`` (``quantize_model``) or
            ``"tfmot8"`` (tfmot's default 8-bit QAT, float scales: a reference).
        bits, per_channel, quantizer_options: as ``quantize_model`` (not for tfmot8).
        qat_epochs, batch_size, optimizer: the QAT fit (default SGD 1e-3).
        every_n_steps: ``ScaleMonitor``'s recording interval.
        stable_switch_epoch: after this many QAT epochs, switch stable-exponent
            quantizers to their stable exponent (needs
            ``quantizer_options={"stable_exponent": True}`` with ``method="msqe"``).
        calibration_examples: training images that set the activation ranges first.

    Returns:
        A dict: ``qmodel``, ``tflite`` (bytes), ``monitor`` (or None), ``accuracy``
        (float, quantized_keras, tflite, keras_tflite_agreement), ``logit_steps``
        (``|Keras - LiteRT|`` logits in output int8 steps: max, p99, mean and the
        fraction within one step), ``litert_rounding`` (the same comparison with the
        Keras model rounding as LiteRT does, ``litert.litert_rounding``; None for
        tfmot8), ``tflite_info``
        (``bytes`` and ``tflite_scale_report``), ``scales`` (flip/clip summary or
        None), ``step_ms`` (median QAT batch time) and ``seconds`` (qat, export).
    """
    from keras_coherence.quantization import ScaleMonitor, quantize_model
    from keras_coherence.quantization.export import run_tflite, tflite_output_step, to_integer_tflite

    (x_train, y_train), (x_test, y_test) = train, test
    tfmot8 = method == "tfmot8"
    if tfmot8 and (bits != 8 or quantizer_options):
        raise ValueError("method='tfmot8' is tfmot's fixed 8-bit scheme: pass bits=8 and no quantizer_options.")
    if stable_switch_epoch is not None and not (quantizer_options or {}).get("stable_exponent"):
        raise ValueError("stable_switch_epoch needs quantizer_options={'stable_exponent': True} (method 'msqe').")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if tfmot8:
        qmodel, monitor = _tfmot8(float_model), None
    else:
        qmodel = quantize_model(float_model, bits=bits, method=method, per_channel=per_channel,
                                quantizer_options=quantizer_options,
                                calibration_data=x_train[:calibration_examples])
        monitor = ScaleMonitor(every_n_steps=every_n_steps)
    timer = StepTimer()
    extra = [timer, *([monitor] if monitor else []), *callbacks]
    if stable_switch_epoch is not None:
        extra.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: (epoch + 1 == stable_switch_epoch
                                              and switch_to_stable_exponents(qmodel))))
    qmodel.compile(optimizer or keras.optimizers.SGD(1e-3), loss, metrics=["accuracy"])
    t0 = time.perf_counter()
    qmodel.fit(x_train, y_train, batch_size=batch_size, epochs=qat_epochs, shuffle=True, callbacks=extra,
               verbose=verbose)
    qat_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    # to_integer_tflite freezes the quantizers: afterwards Keras inference is the exported model.
    tflite_model = _tfmot8_tflite(qmodel) if tfmot8 else to_integer_tflite(qmodel)
    export_seconds = time.perf_counter() - t0
    float_pred = float_model.predict(x_test, batch_size=1024, verbose=0).argmax(1)
    keras_logits = qmodel.predict(x_test, batch_size=1024, verbose=0)
    lite_logits = run_tflite(tflite_model, x_test)
    keras_pred, lite_pred = keras_logits.argmax(1), lite_logits.argmax(1)
    step = tflite_output_step(tflite_model)
    accuracy = {"float": float(np.mean(float_pred == y_test)),
                "quantized_keras": float(np.mean(keras_pred == y_test)),
                "tflite": float(np.mean(lite_pred == y_test)),
                "keras_tflite_agreement": float(np.mean(keras_pred == lite_pred))}
    logit_steps = _logit_steps(keras_logits, lite_logits, step)
    litert = None
    if not tfmot8:  # the same Keras model, rounding as LiteRT does (litert.py)
        from keras_coherence.quantization.litert import litert_rounding

        with litert_rounding(qmodel) as report:
            emulated = qmodel.predict(x_test, batch_size=1024, verbose=0)
        litert = {"agreement": float(np.mean(emulated.argmax(1) == lite_pred)),
                  "accuracy": float(np.mean(emulated.argmax(1) == y_test)),
                  "logit_steps": _logit_steps(emulated, lite_logits, step),
                  "patched": len(report["patched"]), "skipped": report["skipped"]}
    scales = None
    if monitor is not None and monitor.totals:
        last = monitor.totals[-1]
        scales = {
            "records": len(monitor.totals),
            "flips": int(sum(r["scale_flips"] for r in monitor.totals)),
            "mean_flip_rate": float(np.mean([r["scale_flip_rate"] for r in monitor.totals])),
            "final": {k: last[k] for k in ("clip_fraction", "msqe", "wmsqe") if k in last},
            "layers": {r["layer"]: {k: r[k] for k in ("channels", "exponent_min", "exponent_max", "clip_fraction",
                                                       "msqe")}
                       for r in monitor.history if r["step"] == last["step"]},
        }
    return {
        "qmodel": qmodel,
        "tflite": tflite_model,
        "monitor": monitor,
        "accuracy": accuracy,
        "logit_steps": logit_steps,
        "litert_rounding": litert,
        "tflite_info": {"bytes": len(tflite_model), **tflite_scale_report(tflite_model)},
        "scales": scales,
        "step_ms": timer.median_ms(),
        "seconds": {"qat": qat_seconds, "export": export_seconds},
    }
