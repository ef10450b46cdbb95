# Each target creates .venv and installs the project (with the train and dev extras) first,
# so a fresh machine needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test train bench lint check-grads clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -e ".[train,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

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
