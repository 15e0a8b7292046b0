# Two commands set everything up from nothing (a virtual environment in .venv) and run:
#   make demo   the main job
#   make test   the test suite
#   make docs   the documentation site, built strictly into site/
#   make typecheck    mypy over the packages (configured in pyproject.toml)
#   make wheel-check  the wheel as users install it: built, checked, installed outside the checkout, smoke-tested
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= test,examples,bench,docs

.PHONY: setup demo test docs chromium bench clean typecheck wheel-check

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/compare.py

test: $(STAMP) chromium
	$(PY) -m pytest -n 2 -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The docs test renders the built site in headless Chromium (Debian's package). Installed when missing where apt-get
# can (root on Debian, as in CI); elsewhere install it yourself, or set NERO_DOCS_SKIP_BROWSER=1.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: could not install chromium; the docs browser test will fail (NERO_DOCS_SKIP_BROWSER=1 skips it)"

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The wheel as users get it: `python -m build` (the sdist, then the wheel from it), `twine check`, installed (not
# editable) with its torch and jax extras into a fresh virtual environment outside the checkout; then, from outside
# the checkout, the smoke test, the kernels' fallback and cache tests, and mypy --strict over a user's program.
WHEEL_CHECK_DIR ?= $(or $(TMPDIR),/tmp)/nero-core-wheel-check
WHEEL_VENV := $(WHEEL_CHECK_DIR)/venv
wheel-check: $(STAMP)
	rm -rf $(WHEEL_CHECK_DIR) && mkdir -p $(WHEEL_CHECK_DIR)
	$(PY) -m build --outdir $(WHEEL_CHECK_DIR)/dist . > $(WHEEL_CHECK_DIR)/build.log 2>&1 || { cat $(WHEEL_CHECK_DIR)/build.log; exit 1; }
	$(PY) -m twine check --strict $(WHEEL_CHECK_DIR)/dist/*
	$(PY) -m zipfile -l $(WHEEL_CHECK_DIR)/dist/*.whl
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet --no-compile -c requirements/constraints.txt \
		"$$(ls $(WHEEL_CHECK_DIR)/dist/*.whl)[torch,jax]" pytest
	cd $(WHEEL_CHECK_DIR) && venv/bin/python $(CURDIR)/tests/installed/smoke.py
	cd $(WHEEL_CHECK_DIR) && $(abspath $(VENV))/bin/mypy --strict --no-incremental --python-executable venv/bin/python \
		$(CURDIR)/tests/installed/typing_usage.py
	cd $(WHEEL_CHECK_DIR) && NERO_TEST_INSTALLED=1 venv/bin/python -m pytest -q -p no:cacheprovider \
		--confcutdir=$(CURDIR)/tests/installed $(CURDIR)/tests/installed

# Speed (asv_bench/README.md). bench-history measures main's kernel-changing commits not yet in the committed results
# (asv_bench/results; REVS="HEAD" or any revisions instead) and publishes the dashboard; bench-gate compares this
# checkout's ratio benchmarks with the last measured commit's, re-measured here, and fails on a slowdown.
.PHONY: bench-history bench-gate
bench-history: $(STAMP)
	$(PY) asv_bench/history.py $(REVS)

bench-gate: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) asv_bench/gate.py

# The GPU check (asv_bench/gpu_check.py: pytest -m gpu, then the GPT-2-like comparison, written to
# asv_bench/measured/gpt2_gpu.{md,json}), for a machine with CUDA, torch, JAX, CuPy and Triton installed and no network.
# GPU_PYTHON is the Python that has them; this project goes into GPU_SITE with --no-deps, built with the setuptools it
# needs, and the pure-Python packages such a machine lacks come from the wheels in GPU_WHEELS, which gpu-wheels
# downloads where pip reaches PyPI (then carry the folder). CI runs it on CPU:
#   make gpu-check GPU_PYTHON=.venv/bin/python ARGS="--device cpu --quick"
GPU_PYTHON ?= python3
GPU_WHEELS ?= .whl
GPU_SITE ?= $(or $(TMPDIR),/tmp)/nero-gpu-site
GPU_PACKAGES := array-api-compat setuptools
.PHONY: gpu-wheels gpu-check
gpu-wheels: $(GPU_WHEELS)/downloaded
$(GPU_WHEELS)/downloaded:
	$(GPU_PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d $(GPU_WHEELS) \
		-c requirements/constraints.txt $(GPU_PACKAGES)
	touch $@

gpu-check: $(GPU_WHEELS)/downloaded
	rm -rf $(GPU_SITE) $(GPU_SITE)-src && mkdir -p $(GPU_SITE)-src
	$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	tar -c pyproject.toml README.md LICENSE nero_core adapters | tar -x -C $(GPU_SITE)-src  # built outside the checkout
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-build-isolation \
		--no-compile --target $(GPU_SITE) $(GPU_SITE)-src
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) asv_bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info site
