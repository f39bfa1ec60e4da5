# Two commands do all the set-up: `make demo` (main job on the embedded data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m keras_coherence demo --out runs/demo

# One pytest worker per core (-n auto). --dist loadgroup: the modules whose module
# fixtures convert or train models are marked xdist_group and run on one worker each
# (their fixtures are built once, not on both workers); every other test goes to
# whichever worker is free. (With --dist loadfile one worker was left alone with the
# heaviest files at the end.)
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup tests

bench: $(STAMP)
	$(PY) benchmarks/coherence_overhead.py

clean:
	rm -rf $(VENV) runs *.egg-info
