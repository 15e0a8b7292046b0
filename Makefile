# Two commands set everything up from nothing (a virtual environment in .venv) and run:
#   make demo   the main job
#   make test   the test suite
#   make docs   the documentation site, built strictly into site/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= test,examples,bench,docs

.PHONY: setup demo test docs chromium bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info site
