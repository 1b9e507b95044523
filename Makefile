# The two commands of the README: `make run` and `make test`. Both create .venv and
# install Shoal (editable, with its test extra) when pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

ARGS        ?=
PYTEST_ARGS ?=

.PHONY: run test docs clean

# Config's defaults are the dev defaults (MQTT 127.0.0.1:1883, admin 127.0.0.1:8080,
# data in ./data); override with e.g. `make run ARGS="--mqtt-port 1884"` or SHOAL_* vars.
run: $(STAMP)
	$(VENV)/bin/shoal run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Rewrite the option table in README.md from node/config.py.
docs: $(STAMP)
	$(VENV)/bin/python -m node.config README.md

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
