# The two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: venv train test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@# The tensorflow wheel depends on keras and imports it at start-up when it
	@# is installed; tfgpt uses none of it, so the environment goes without.
	$(PY) -m pip uninstall --quiet --yes keras
	touch $@

train: venv
	$(PY) train.py $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

bench: venv
	$(PY) -m tfgpt.bench $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
