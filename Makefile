# Two commands do all the set-up: `make demo` (main job on the embedded data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-device venv bench clean

venv: $(STAMP)

# uv resolves and installs the same versions as pip, faster: a fresh venv with no cache on
# this 2-core machine took 44 s against pip's 103 s. --compile-bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE=1 is set (as on these machines), nothing writes .pyc files later,
# and without them every process compiles TensorFlow's sources again: importing
# tensorflow, tf_keras, larq and tfmot took 16-19 s of CPU against 6-7 s, in each of the
# suite's test workers and subprocesses. pip takes over if uv fails.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[test]' || \
		{ echo "uv failed; installing with pip" >&2; $(PY) -m pip install -q -e '.[test]'; }
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m keras_coherence demo --out runs/demo

# One pytest worker per core (-n auto). --dist worksteal keeps both cores busy to the
# end; with --dist loadfile one worker was left alone with the heaviest files. A module
# fixture whose tests land on both workers is built twice, which costs far less.
test: $(STAMP)
	$(VENV)/bin/ruff check --no-cache .
	$(PY) -m pytest -q -n auto --dist worksteal tests

# Only the on-device training exports (builtin-only op codes of every model,
# standard_device and low-memory; Keras <-> LiteRT step parity; the device memory
# layout against real exports), which `make test` runs too.
test-device: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal -m device_export tests

bench: $(STAMP)
	$(PY) benchmarks/coherence_overhead.py

clean:
	rm -rf $(VENV) runs *.egg-info
