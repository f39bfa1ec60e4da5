"""--out handling shared by every command: checked before any work, replaced only on
success (a failed, interrupted or killed rerun leaves the previous results as they were)."""
import json
import os

import pytest

from keras_coherence import cli
from keras_coherence.workflows import aggregate, bnn, coherence, demo, quantize


def _fake_run(calls, behaviour="ok", csv_text="step,value\n0,1\n"):
    """A stand-in for workflows.coherence.run: writes a CSV and a summary that records its own
    path (as the real runs do), then succeeds or fails as told."""
    def run(args, out_dir, log=print):
        calls.append(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "coherence.csv"), "w") as f:
            f.write(csv_text)
        if behaviour == "interrupt":
            raise KeyboardInterrupt
        if behaviour == "error":
            raise cli.UsageError("the run failed halfway")
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({"files": {"csv": os.path.join(out_dir, "coherence.csv")}}, f)
        log(f"wrote {os.path.join(out_dir, '')}coherence.csv")
        return {}
    return run


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _hidden(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_results_land_in_out_with_their_final_paths(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(coherence, "run", _fake_run(calls))
    out = tmp_path / "runs" / "first"
    assert cli.main(["coherence", "--out", str(out)]) == 0
    assert calls[0] != str(out)  # the run wrote into a staging folder ...
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"]["csv"] == os.path.join(str(out), "coherence.csv")  # ... named as final
    assert f"wrote {os.path.join(str(out), '')}coherence.csv" in capsys.readouterr().out
    assert _hidden(tmp_path / "runs") == []


@pytest.mark.parametrize("behaviour, status", [("interrupt", 130), ("error", 2)])
def test_failed_rerun_leaves_the_previous_results_untouched(tmp_path, monkeypatch, behaviour, status):
    out = tmp_path / "run"
    monkeypatch.setattr(coherence, "run", _fake_run([]))
    assert cli.main(["coherence", "--out", str(out)]) == 0
    before = _snapshot(out)
    monkeypatch.setattr(coherence, "run", _fake_run([], behaviour, csv_text="partial\n"))
    assert cli.main(["coherence", "--out", str(out)]) == status
    assert _snapshot(out) == before
    assert _hidden(tmp_path) == []


def test_successful_rerun_replaces_the_whole_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old_plot.png").write_bytes(b"old")
    monkeypatch.setattr(coherence, "run", _fake_run([], csv_text="new\n"))
    assert cli.main(["coherence", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["coherence.csv", "summary.json"]
    assert (out / "coherence.csv").read_text() == "new\n"
    assert _hidden(tmp_path) == []


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    stale = tmp_path / ".run.partial-abc123"
    stale.mkdir()
    (stale / "coherence.csv").write_text("half")
    monkeypatch.setattr(coherence, "run", _fake_run([]))
    assert cli.main(["coherence", "--out", str(tmp_path / "run")]) == 0
    assert not stale.exists()


@pytest.mark.parametrize("command", ["coherence", "aggregate", "quantize", "bnn", "demo"])
@pytest.mark.parametrize("where, fragment", [
    ("a_file", "is a file, not a directory"),
    ("under_a_file", "which is a file"),
    ("proc", "cannot be written"),
])
def test_unusable_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys, command, where, fragment):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the run started although --out is unusable")

    for workflow in (coherence, aggregate, quantize, bnn):
        monkeypatch.setattr(workflow, "run", must_not_run)
    monkeypatch.setattr(demo, "SECTIONS", {"x": ("never", must_not_run)})
    (tmp_path / "afile").write_text("not a directory")
    out = {"a_file": tmp_path / "afile", "under_a_file": tmp_path / "afile" / "sub",
           "proc": "/proc/keras_coherence_cannot_write_here"}[where]
    assert cli.main([command, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "--out" in err and len(err.splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "not a directory"
