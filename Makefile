# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Each creates and uses a local virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
# On these CPU machines `torch==2.13.0` resolves to a local CPU build. GPU users: make
# TORCH_SPEC=torch (or install their CUDA build into the venv first).
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/ml100k-cpu.yaml
BIN := $(VENV)/bin

.PHONY: venv demo quick test bench-teachers clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $@

# the whole DELRec experiment on ML-100K with the offline default backbone (see README)
demo: venv
	$(BIN)/delrec run --config $(CONFIG)

quick: venv
	$(BIN)/delrec run --config configs/ml100k-quick.yaml

test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench-teachers: venv
	$(BIN)/python benchmarks/teachers.py

clean:
	rm -rf $(VENV) runs
