# `make run` and `make test` do all set-up on a fresh machine: a venv with the pinned versions.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
RECIPE ?= demo

.PHONY: run test venv clean runner runner-aarch64 test-aarch64 pi-kit notebook

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The main job on its defaults: recipe demo packages, grades and times the released hand-in and runs one
# real pruning step (minutes on a CPU); RECIPE=quick trains everything from scratch instead (see README).
run: venv
	$(VENV)/bin/mobileprune run --recipe $(RECIPE)

# Two workers, one thread each (tests/conftest.py): the suite is as much process start-up, tracing
# and export as arithmetic, and two such streams fill two cores where one does not (fresh clone,
# 2026-12-06: pytest 737 s on one process, 531 s on two; docs/history.md).
test: venv runner
	$(PY) -m pytest -q -n 2 --dist worksteal

# The lab notebook, rebuilt from notebooks/build.py and executed on the best results present
# (release/, else runs/; see mobileprune.report.find_results).
notebook: venv
	$(PY) notebooks/build.py

# The lab's native runner, built against the executorch wheel's headers and libraries.
runner: venv
	cmake -S runner -B build -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH=$$($(PY) -c 'import executorch; print(list(executorch.__path__)[0])') > /dev/null
	cmake --build build -j2

# Raspberry Pi (aarch64) build of the runner, and a check of it under qemu (slow: ~3 s an image).
runner-aarch64: venv
	PY=$(PY) runner/aarch64.sh build

test-aarch64: venv runner
	PY=$(PY) runner/aarch64.sh test

# build/pi-kit.tar.gz: the aarch64 runner, its libraries, runner/bench.sh, the test file and the
# released programs, to time them on a Raspberry Pi in one command (runner/aarch64.sh says how).
pi-kit: venv
	PY=$(PY) runner/aarch64.sh kit

clean:
	rm -rf runs build .pytest_cache
