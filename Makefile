# Bootstraps a virtual environment on a fresh machine and runs the project's jobs.
# CPU machines: torch==2.13.0 is installed first (a CPU build lies on disk); a GPU
# machine that already has torch keeps its own (set TORCH_SPEC= to skip).
# EXTRAS=dev,docs,triton adds Triton (about 1 GB: the fused kernel's interpreter tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,docs
PIP := $(BIN)/python -m pip -q --disable-pip-version-check --no-input
export PIP_ROOT_USER_ACTION := ignore

.PHONY: venv test compare docs typecheck bench clean

$(BIN)/.ok: pyproject.toml
	@echo "setting up $(VENV) (torch first, then pipeoptim[$(EXTRAS)]); a few minutes"
	@$(PY) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install "$(TORCH_SPEC)"; fi
	@$(PIP) install -e ".[$(EXTRAS)]"
	@touch $@

venv: $(BIN)/.ok

test: venv
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

compare: venv
	$(BIN)/pipeoptim compare

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
