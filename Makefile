# The two commands of the README: `make run` and `make test`. Both create .venv and
# install Shoal (editable, with its test extra) when pyproject.toml changed; `make test`
# also installs the Debian packages the tests use (tests/system-packages.sh).

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

ARGS        ?=
PYTEST_ARGS ?=

.PHONY: run run-node test simulate system-packages docs clean

# A local 3-node cluster: MQTT on 127.0.0.1:1883-1885, admin API on 127.0.0.1:8080-8082,
# node-to-node ports from 7001, data in ./data/nodeN; Ctrl-C stops it.
# Override with e.g. `make run ARGS="--nodes 5 --base-port 2883"`.
run: $(STAMP)
	$(VENV)/bin/shoal cluster up --nodes 3 $(ARGS)

# One node alone, no cluster: `make run-node ARGS="--mqtt-port 1884"`.
run-node: $(STAMP)
	$(VENV)/bin/shoal run $(ARGS)

# the Debian packages first: python3-venv is one of them
test: system-packages $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The deterministic simulation of a cluster (cluster/simulation.py): `make simulate
# SEEDS=300`, or one seed with its whole trace: `make simulate SEED=17`. The last line:
# simulation: seeds=N steps=S violations=V trace=<digest> (the same seeds, the same digest).
SEEDS ?= 300
SEED  ?=
simulate: $(STAMP)
	PYTHONHASHSEED=0 $(VENV)/bin/python -m cluster.simulation \
		$(if $(SEED),--seed $(SEED),--seeds $(SEEDS)) $(SIM_ARGS)

system-packages:
	tests/system-packages.sh

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
