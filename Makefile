# The two commands of the README. Both bootstrap .venv idempotently: torch's CPU wheel
# (2.13.0, on this machine's disk) goes in first so that nothing pulls a CUDA build.
# `make docs` regenerates the option reference and builds the documentation site into build/site.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,lora,gym,bench,tensorboard,wandb,mlflow,trackio,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/frugalrl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=10

docs: $(STAMP)
	$(BIN)/python -m frugalrl.optionref
	$(BIN)/python -m mkdocs build --strict -d build/site

clean:
	rm -rf $(VENV) runs .cache
