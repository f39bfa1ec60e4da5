"""Fixtures and helpers shared by the command-line tests (test_cli*.py)."""
import csv
import json
import os

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cache_in_tmp(tmp_path, monkeypatch):
    """Never touch the user's real cache directory."""
    monkeypatch.setenv("KERAS_COHERENCE_CACHE", str(tmp_path / "cache"))


def read_csv(path):
    """The rows of a CSV file as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_run_outputs(out, table):
    """A command's run directory ``out`` holds ``<table>.csv``, ``<table>.png`` and
    ``summary.json``; returns the CSV rows and the parsed summary."""
    for name in (f"{table}.csv", f"{table}.png", "summary.json"):
        assert (out / name).is_file(), name
    return read_csv(out / f"{table}.csv"), json.loads((out / "summary.json").read_text())


def assert_png(path):
    """``path`` (str or Path) is a PNG image of more than 100x100 pixels that is not blank."""
    path = os.fspath(path)
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image.std()) > 0  # not a blank canvas


def assert_one_line_usage_error(capsys, fragment):
    """The command printed a one-line error naming ``fragment`` on stderr, no traceback."""
    captured = capsys.readouterr()
    message = captured.err.strip()
    assert fragment in message and "error" in message
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in captured.err + captured.out


def assert_help_lists(capsys, main, command, present, absent=()):
    """``command --help`` exits 0 and its text names every ``present`` and no ``absent`` string."""
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in present:
        assert option in text
    for option in absent:
        assert option not in text
