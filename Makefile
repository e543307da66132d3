# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): requirements.txt requirements-dev.txt requirements-metrics.txt constraints.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt -c constraints.txt
	# metric references without their torchvision dependency (it does not load beside CPU torch)
	$(VENV)/bin/pip install -q --no-deps -r requirements-metrics.txt -c constraints.txt
	$(VENV)/bin/pip install -q --no-deps -e . -c constraints.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m leffa_jax.demo

test: $(STAMP)
	bash tools/run_tests.sh

.PHONY: setup demo test
