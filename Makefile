# One command to set up and run the offline demo, one to run the tests. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-scst app browser test lint format clean

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

# The web demo on the demo's output (run `make demo` first): http://127.0.0.1:7860, the base model's caption beside.
app: setup
	$(PY) app.py --model outputs/demo --compare

# Debian's chromium and chromium-driver for the browser test of the web demo (tests/test_app.py, skipped without
# them): installed with apt-get when run as root, else a note on how to.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing chromium and chromium-driver (apt-get) for tests/test_app.py"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "browser: apt-get could not install chromium; tests/test_app.py's browser test will be skipped"; \
	else \
		echo "browser: no chromium/chromedriver (sudo apt-get install chromium chromium-driver); the browser test will be skipped"; \
	fi

test: setup browser
	$(PY) -m pytest -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo/build outputs .pytest_cache
