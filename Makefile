# Each target creates .venv and installs the project (with the train and dev extras) first,
# so a fresh machine needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INTEGRATIONS := $(VENV)/.integrations

.PHONY: test test-integrations train bench lint check-grads clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -e ".[train,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# The real clients (Lightning, accelerate, skorch, ONNX, ...) and the tutorial notebook:
# installs the integrations extra into .venv, then runs the tests marked integration
# (tests/integration/ and the docs blocks that need the extra).
$(INTEGRATIONS): $(STAMP)
	$(PY) -m pip install -e ".[train,dev,integrations]"
	touch $(INTEGRATIONS)

test-integrations: $(INTEGRATIONS)
	$(PY) -m pytest -m integration tests/integration tests/test_docs.py

train: $(STAMP)
	$(PY) train.py $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

check-grads: $(STAMP)
	$(PY) -m torch_mlp.testing

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs data .pytest_cache
