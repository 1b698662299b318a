# Bootstraps a virtual environment on a fresh machine and runs the project's jobs.
# CPU machines: torch==2.13.0 is installed first (a CPU build lies on disk); a GPU
# machine that already has torch keeps its own (set TORCH_SPEC= to skip).
# EXTRAS=dev,docs,triton adds Triton (about 1 GB: the fused kernel's interpreter tests).
# --no-compile: bytecode is written at first import, only for the modules used (saves ~150 MB).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,docs
INSTALL := $(BIN)/python -m pip -q --disable-pip-version-check --no-input install --no-compile
export PIP_ROOT_USER_ACTION := ignore

.PHONY: venv test test-fast compare readme docs typecheck bench clean

$(BIN)/.ok: pyproject.toml
	@echo "setting up $(VENV) (torch first, then pipeoptim[$(EXTRAS)]); a few minutes"
	@$(PY) -m venv $(VENV)
	@$(INSTALL) --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(INSTALL) "$(TORCH_SPEC)"; fi
	@$(INSTALL) -e ".[$(EXTRAS)]"
	@touch $@

venv: $(BIN)/.ok

test: venv
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

# the inner loop: every test but those marked slow (torchrun soak runs, end-to-end example and
# README runs, exhaustive schedule sweeps); `make test` runs them all
test-fast: venv
	$(BIN)/python -m pytest -q -x -p no:cacheprovider -m "not slow"

compare: venv
	$(BIN)/pipeoptim compare

# the same comparison, its table, command, date, device and time written into README.md's block
readme: venv
	$(BIN)/pipeoptim compare --readme README.md

docs: venv
	$(BIN)/sphinx-build -W -q -b html docs docs/_build/html
	$(BIN)/python docs/check_anchors.py docs/_build/html

typecheck: venv
	$(BIN)/python -m mypy  # files and settings: [tool.mypy] in pyproject.toml

bench: venv
	$(BIN)/python benchmarks/predict_bandwidth.py
	$(BIN)/python benchmarks/pipeline_step.py

clean:
	rm -rf $(VENV) docs/_build
