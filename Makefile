# Bootstraps a virtual environment on a fresh machine and runs the project's jobs.
# CPU machines: torch==2.13.0 is installed first (a CPU build lies on disk); a GPU
# machine that already has torch keeps its own (set TORCH_SPEC= to skip).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test compare docs bench clean

$(BIN)/.ok: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev,docs]"
	touch $@

venv: $(BIN)/.ok

test: venv
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

compare: venv
	$(BIN)/pipeoptim compare

docs: venv
	$(BIN)/sphinx-build -W -q -b html docs docs/_build/html

bench: venv
	$(BIN)/python benchmarks/predict_bandwidth.py
	$(BIN)/python benchmarks/pipeline_step.py

clean:
	rm -rf $(VENV) docs/_build
