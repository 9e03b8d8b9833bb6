# Set-up and the two everyday commands. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed on its own first: the project's open range would otherwise pull the newest
# CUDA build. Override for your machine, e.g. make test TORCH="torch==2.5.1".
TORCH ?= torch==2.13.0

.PHONY: install demo test test-all clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,train,ui]"

demo: install
	$(BIN)/diffsr demo -o demo-out

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) demo-out .pytest_cache
