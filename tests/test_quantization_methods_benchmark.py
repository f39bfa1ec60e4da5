"""benchmarks/quantization_methods.py: seed parsing and the over-seed summary.

The statistics are checked against numpy (mean, std with ddof=1, min, max) and the
paired control differences against a hand-written loop; nothing here trains a model.
"""
import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "quantization_methods.py")


@pytest.fixture(scope="module")
def qm():
    spec = importlib.util.spec_from_file_location("quantization_methods_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_parse_to_a_list(qm):
    assert qm.parse_seeds("0,1,2") == [0, 1, 2]
    assert qm.parse_seeds("7") == [7]
    assert qm.parse_args(["--seeds", "3,5"]).seed_list == [3, 5]


@pytest.mark.parametrize("text, words", [
    ("0,a", "comma-separated integers"),
    ("", "at least one"),
    ("1,1", "repeats a seed"),
    ("-1", "non-negative"),
])
def test_bad_seeds_raise_a_clear_error(qm, text, words):
    with pytest.raises(ValueError, match=words):
        qm.parse_seeds(text)


def test_bad_arguments_exit_with_a_message(qm, capsys):
    for argv, words in ((["--seeds", "x"], "--seeds must be"), (["--methods", "float+ft,nope"], "unknown methods"),
                        (["--qat-epochs", "0"], "--qat-epochs must be at least 1")):
        with pytest.raises(SystemExit) as exc:
            qm.parse_args(argv)
        assert exc.value.code == 2  # argparse's usage error, not a silent exit 0
        assert words in capsys.readouterr().err


def _row(seed, method, keras, tflite=None, float_acc=0.5):
    return {"model": "m", "seed": seed, "method": method, "float": float_acc, "keras": keras, "tflite": tflite,
            "agreement": None, "logit_steps_p99": None, "litert_agreement": None, "litert_logit_steps_max": None,
            "flip_rate": None, "clip_fraction": None, "step_ms": 10.0 + seed, "all_scales_po2": method != "float+ft",
            "po2_tensors": None if method == "float+ft" else "3/3"}


def test_summary_matches_numpy_and_pairs_by_seed(qm):
    control = {0: 0.80, 1: 0.90, 2: 0.85}
    quant = {0: 0.83, 1: 0.88, 2: 0.91}
    # Rows out of seed order: the pairing must go by seed, not by position.
    rows = [_row(s, "float+ft", control[s]) for s in (2, 0, 1)] + [_row(s, "q", quant[s], quant[s] - 0.01)
                                                                     for s in (0, 1, 2)]
    summary = {e["method"]: e for e in qm.summarize(rows)}
    q = np.array([quant[s] for s in (0, 1, 2)])
    s = summary["q"]["keras"]
    assert s["n"] == 3
    np.testing.assert_allclose([s["mean"], s["std"], s["min"], s["max"]],
                               [q.mean(), q.std(ddof=1), q.min(), q.max()], rtol=1e-12)
    np.testing.assert_allclose(summary["q"]["tflite"]["mean"], (q - 0.01).mean(), rtol=1e-12)
    diffs = np.array([quant[k] - control[k] for k in (0, 1, 2)])  # +0.03, -0.02, +0.06
    d = summary["q"]["vs_control"]
    np.testing.assert_allclose([d["mean"], d["std"], d["min"], d["max"]],
                               [diffs.mean(), diffs.std(ddof=1), diffs.min(), diffs.max()], rtol=1e-12)
    assert summary["float+ft"]["vs_control"] is None  # the control is not compared with itself
    assert summary["float+ft"]["tflite"] is None  # no TFLite model: no number, not a zero
    assert summary["q"]["all_scales_po2"] and not summary["float+ft"]["all_scales_po2"]


def test_one_seed_has_no_spread_and_the_table_says_so(qm):
    rows = [_row(0, "float+ft", 0.8), _row(0, "q", 0.75, 0.74)]
    summary = qm.summarize(rows)
    assert summary[1]["keras"]["std"] is None
    table = qm.format_tables(summary)
    assert "| m | q | 1 | 0.500 | 0.750 | 0.740 |" in table  # a bare mean, no "± 0.000"
    assert "| m | q | -5.0 points | -5.0 .. -5.0 | 1 |" in table


def test_table_shows_mean_and_std(qm):
    rows = [_row(s, "q", k) for s, k in ((0, 0.70), (1, 0.80), (2, 0.90))]
    table = qm.format_tables(qm.summarize(rows))
    assert "| 0.800 ± 0.100 |" in table  # std of 0.7, 0.8, 0.9 with ddof=1 is exactly 0.1


def test_litert_parity_column_is_the_worst_seed(qm):
    rows = [_row(s, "q", 0.8) for s in (0, 1, 2)]
    for r, agreement, steps in zip(rows, (1.0, 0.998, 1.0), (0.0, 5.0, 0.0)):
        r["litert_agreement"], r["litert_logit_steps_max"] = agreement, steps
    table = qm.format_tables(qm.summarize(rows))
    assert "| 0.998 (5) |" in table  # not the means 0.999 (2)
