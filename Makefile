# One command to set up and run the offline demo, one to run the tests. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-scst test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) demo/build_demo.py
	$(PY) run_captioning.py --config configs/demo.yaml --output_dir outputs/demo --overwrite_output_dir

# Second stage: self-critical training from the demo's cross-entropy adapter (run `make demo` first).
demo-scst: setup
	$(PY) run_captioning.py --config configs/demo_scst.yaml --output_dir outputs/demo_scst --overwrite_output_dir

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo/build outputs .pytest_cache
