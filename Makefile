# The two set-up commands of the README. Each creates .venv (if needed) and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'

# The main job on the embedded default: tiny models + data made here, the whole pipeline, one table.
demo: install
	$(BIN)/vlsi-demo --out $(OUT) $(DEMO_ARGS)

# The test suite (CI runs this through .ci/run).
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
