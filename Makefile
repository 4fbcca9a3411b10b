# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Each creates or reuses its virtual environment and installs what it needs.
PYTHON ?= python3
DEV_VENV := .venv
RUNTIME_VENV := .venv-runtime
RUNTIME_SOURCES := $(shell find tsrt -name '*.py' -o -name '*.onnx' -o -name '*.json' -o -name '*.toml' 2>/dev/null) pyproject.toml

.PHONY: demo test test-fast dev runtime clean

# Runtime-only install (no torch): what a hospital workstation gets with `pip install tsrt`.
$(RUNTIME_VENV)/.installed: $(RUNTIME_SOURCES)
	test -d $(RUNTIME_VENV) || $(PYTHON) -m venv $(RUNTIME_VENV)
	rm -rf build  # setuptools reuses build/lib: a module moved away would still ship
	$(RUNTIME_VENV)/bin/pip install --quiet --disable-pip-version-check .
	touch $@

# Development install: runtime + the torch toolchain (export/, its own distribution, so the runtime wheel
# carries no torch code or test fixtures) + the parity oracles (nnunetv2, TotalSegmentator).
$(DEV_VENV)/.installed: pyproject.toml export/pyproject.toml
	test -d $(DEV_VENV) || $(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]' -e ./export
	touch $@

runtime: $(RUNTIME_VENV)/.installed
dev: $(DEV_VENV)/.installed

demo: $(RUNTIME_VENV)/.installed
	$(RUNTIME_VENV)/bin/tsrt demo -o demo_output

# UTF-8 mode: tests decode the CLI's (rich, Unicode) output whatever locale CI runs with.
# Two pytest workers (pytest-xdist), a test file each at a time (module fixtures are built once): much of the
# suite waits on one thread (official TotalSegmentator's pipeline, subprocesses, I/O), so the two cores overlap it.
# Each worker's OpenMP (torch), numba and tsrt's own sessions (which read OMP_NUM_THREADS too) use one thread: two
# workers already fill two cores, and spinning threads of one would take the other's core (suite 1189 -> 1020 s).
test: $(DEV_VENV)/.installed
	PYTHONUTF8=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 $(DEV_VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=30

# Day-to-day tier (< 3 min): no oracle runs (torch, nnU-Net, official TotalSegmentator), nothing slow.
test-fast: $(DEV_VENV)/.installed
	PYTHONUTF8=1 $(DEV_VENV)/bin/python -m pytest -q -m "not slow and not oracle"

clean:
	rm -rf demo_output .pytest_cache build *.egg-info
