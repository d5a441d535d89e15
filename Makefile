# The two commands of the README. Both create/refresh .venv and install from the repository's own files.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test lint venv

$(STAMP): pyproject.toml requirements/constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c requirements/constraints.txt -e '.[test,interop]'
	touch $(STAMP)

venv: $(STAMP)

# Main job: train a tiny LLaVA to caption the embedded shapes images, then caption held-out ones (CPU).
train: $(STAMP)
	$(VENV)/bin/python -m functional_mm.train --config configs/llava.py:tiny --workdir runs/llava_tiny

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -x --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
