"""The ``aggregate`` command, the aggregation demo section, the arms and
keras_coherence.workflows.experiments."""
import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import assert_png as _assert_png
from conftest import read_csv as _read_csv
from conftest import read_run_outputs

from keras_coherence import cli
from keras_coherence.aggregation import arms
from keras_coherence.workflows import demo, experiments

pytestmark = pytest.mark.usefixtures("cache_in_tmp")


TINY = ["--max-train", "200", "--epochs", "2", "--batch-size", "50", "--hidden", "16",
        "--label-noise", "0.5", "--quiet", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny_aggregate(tmp_path_factory):
    out = tmp_path_factory.mktemp("aggregate")
    code = cli.main(["aggregate", *TINY, "--aggregator", "winsorized:c=2", "--report-coherence",
                     "--out", str(out)])
    return code, out


def test_aggregate_writes_consistent_outputs(tiny_aggregate):
    code, out = tiny_aggregate
    assert code == 0
    rows, summary = read_run_outputs(out, "aggregate")

    assert summary["command"] == "aggregate"
    assert summary["aggregator"] == {"spec": "winsorized:c=2", "label": "WGD c=2", "kind": "aggregator"}
    assert summary["data"]["num_train"] == 200 and summary["data"]["num_corrupted_labels"] == 100
    training = summary["training"]
    assert (training["epochs"], training["steps"], training["steps_per_epoch"]) == (2, 8, 4)
    assert training["seconds_per_epoch"] > 0
    # One row before training, then one per epoch.
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [int(r["step"]) for r in rows] == [0, 4, 8]
    assert list(rows[0])[:7] == ["epoch", "step", "seconds", "pristine_accuracy", "corrupt_accuracy",
                                 "corrupt_true_accuracy", "test_accuracy"]
    # Accuracies are whole counts of 100 pristine / 100 corrupt / 1,000 test examples.
    for r in rows:
        for key, count in (("pristine_accuracy", 100), ("corrupt_accuracy", 100),
                           ("corrupt_true_accuracy", 100), ("test_accuracy", 1000)):
            assert float(r[key]) * count == pytest.approx(round(float(r[key]) * count)), key
    # Corrupt labels never equal the true ones (mode uniform): the two accuracies on the
    # corrupt examples cannot add up to more than 1.
    assert all(float(r["corrupt_accuracy"]) + float(r["corrupt_true_accuracy"]) <= 1.0 + 1e-9 for r in rows)

    final, last = summary["accuracy"]["final"], rows[-1]
    assert final["epoch"] == 2
    for key in ("pristine", "corrupt", "corrupt_true", "test"):
        assert final[key] == pytest.approx(float(last[f"{key}_accuracy"]), abs=1e-6)
    tests = [float(r["test_accuracy"]) for r in rows[1:]]
    assert summary["accuracy"]["best_test"]["value"] == pytest.approx(max(tests), abs=1e-6)
    assert summary["accuracy"]["max_corrupt"]["value"] == pytest.approx(
        max(float(r["corrupt_accuracy"]) for r in rows[1:]), abs=1e-6)

    # --report-coherence: mean batch m-coherence per epoch, between 0 and the batch size.
    coherence = [float(r["m_coherence"]) for r in rows[1:]]
    assert all(0 < v <= 50 for v in coherence)
    assert rows[0]["m_coherence"] == ""  # nothing measured before training
    assert summary["m_coherence"]["last_epoch"] == pytest.approx(coherence[-1], rel=1e-5)
    assert summary["m_coherence"]["peak"] == pytest.approx(max(coherence), rel=1e-5)
    _assert_png(out / "aggregate.png")


@pytest.mark.parametrize("spec, kind", [("sgd", "sgd"), ("mean", "sgd"), ("m3", "aggregator"),
                                        ("rm3", "running"), ("ra3", "running")])
def test_aggregate_other_aggregators(spec, kind, tmp_path, capsys):
    argv = ["aggregate", "--max-train", "100", "--epochs", "1", "--batch-size", "25", "--hidden", "8",
            "--quiet", "--aggregator", spec, "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["aggregator"]["kind"] == kind
    assert summary["data"]["num_corrupted_labels"] == 0
    rows = _read_csv(tmp_path / "aggregate.csv")
    assert "corrupt_accuracy" not in rows[0] and "m_coherence" not in rows[0]  # no noise, no coherence
    assert float(rows[-1]["pristine_accuracy"]) == pytest.approx(summary["accuracy"]["final"]["pristine"])
    assert summary["accuracy"]["final"]["corrupt"] is None
    printed = capsys.readouterr().out
    assert "final accuracy: pristine" in printed and "aggregate.csv" in printed


@pytest.mark.parametrize("spec, fragment", [
    ("bogus", "Unknown aggregator 'bogus'"),
    ("winsorized:c=x", "needs a number"),
    ("winsorized:c=-1", "non-negative"),
    ("winsorized", "exactly one of c"),
    ("winsorized:c=25", "more than 50 examples per batch"),  # batch 50
    ("winsorized:percentile=60", "[0, 50)"),
    ("m3:groups=0", "positive integer"),
    ("m3:groups=80", "80 groups"),
    ("m3:foo=2", "foo"),
    ("rm0", "at least 1"),
    ("rm", "give the window"),
    ("", "non-empty"),
])
def test_bad_aggregator_exits_2_with_one_line(spec, fragment, capsys, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["aggregate", *TINY, "--aggregator", spec, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    message = captured.err.strip()
    assert message.startswith("keras-coherence aggregate: error: --aggregator")
    assert fragment in message, message
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


def test_short_last_batch_is_rejected_before_training(capsys, tmp_path):
    # 210 examples in batches of 50: the last batch has 10 examples, too few for c=5.
    argv = ["aggregate", *TINY, "--max-train", "210", "--aggregator", "winsorized:c=5", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert "last batch (210 % 50) has 10" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    # c=4 fits in a batch of 10 (tracing a second winsorized step for it is too slow here).
    experiments.check_arm(experiments.parse_arm("winsorized:c=4"), 50, 210)


def test_aggregate_help_lists_the_options(capsys):
    assert cli.main(["aggregate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--aggregator" in text and "--report-coherence" in text and "--label-noise" in text
    assert cli.main(["--help"]) == 0
    assert "aggregate" in capsys.readouterr().out


def test_demo_aggregation_section(tmp_path, capsys, monkeypatch):
    # The real section (300 images, 40 epochs) takes about a minute; this one a few seconds.
    preset = demo.PRESETS["aggregation"]
    monkeypatch.setitem(demo.PRESETS, "aggregation", dataclasses.replace(
        preset, base=dataclasses.replace(preset.base, max_train=100, epochs=2, hidden=(8,))))
    assert cli.main(["demo", "--only", "aggregation", "--out", str(tmp_path), "--quiet"]) == 0
    section = tmp_path / "aggregation"
    _assert_png(section / "aggregation.png")
    for folder in ("sgd", "winsorized_c8", "rm3"):
        summary = json.loads((section / folder / "summary.json").read_text())
        assert summary["data"]["num_train"] == 100 and summary["data"]["num_corrupted_labels"] == 50
        assert summary["training"]["epochs"] == 2
    printed = capsys.readouterr().out
    assert "aggregation" in printed and "WGD c=8 corrupt" in printed and "demo finished" in printed
    assert not (tmp_path / "coherence").exists()  # --only


# ------------------------------------------------------------------------ experiments


def test_parse_arm_and_labels():
    assert experiments.parse_arm("SGD").kind == "sgd"
    assert experiments.parse_arm("wgd:c=0").label == "WGD c=0 (=SGD)"
    arm = experiments.parse_arm("ra5")
    assert (arm.kind, arm.window, arm.reduction, arm.label) == ("running", 5, "mean", "RA5")
    assert experiments.parse_arm("m3:groups=5").label == "M3 (5 groups)"
    assert experiments.parse_arm("winsorized:percentile=2").spec == "winsorized:percentile=2"
    assert experiments.parse_arm("rm4").window == 4  # even windows: mean of the two middle values
    with pytest.raises(ValueError, match="at least 1"):
        experiments.parse_arm("ra0")
    with pytest.raises(ValueError, match="only batch"):
        experiments.check_arm(experiments.parse_arm("winsorized:c=4"), 100, 8)
    experiments.check_arm(experiments.parse_arm("winsorized:c=4"), 100, 4000)
    with pytest.raises(ValueError, match="last batch"):
        experiments.check_arm(experiments.parse_arm("winsorized:c=4"), 100, 4005)


def test_subset_accuracy_and_files(tmp_path):
    from keras_coherence import models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = experiments.build_arm_model("rm3", models.mlp((5,), 2, hidden=(8,)), 0.1)
    tracker = experiments.SubsetAccuracy({"a": (x[:32], y[:32]), "b": (x[32:], y[32:]),
                                          "b_flipped": (x[32:], 1 - y[32:])}, epochs=[2, 3])
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[tracker])
    assert [r["epoch"] for r in tracker.rows] == [0, 2, 3]
    assert [r["step"] for r in tracker.rows] == [0, 8, 12]
    for r in tracker.rows:
        assert r["b_accuracy"] + r["b_flipped_accuracy"] == pytest.approx(1.0)
    assert tracker.rows[-1]["a_accuracy"] == pytest.approx(experiments.accuracy(model, x[:32], y[:32]))
    path = experiments.write_csv(str(tmp_path / "rows.csv"), tracker.rows)
    back = experiments.read_rows(path)
    assert back[0]["loss"] is None and back[-1]["epoch"] == 3
    assert back[-1]["b_accuracy"] == pytest.approx(tracker.rows[-1]["b_accuracy"])
    assert experiments.log_spaced_epochs(5, 3) == [0, 1, 2, 5] and experiments.log_spaced_epochs(0) == [0]
    assert math.isnan(experiments.accuracy(model, x[:0], y[:0]))


def test_experiments_docstring_examples():
    import doctest

    for module in (experiments, arms):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
