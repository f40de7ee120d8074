# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   - create .venv, install topo, run `topo bench` on a local CPU mesh
#   make test   - create .venv, install topo with its test extras, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# A CPU build of this torch lies on the CI machines' disk; elsewhere pip falls back to any torch>=2.4.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.topo-installed

.PHONY: demo test lint contract plan clean

$(BIN)/python:
	@echo "make: creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "make: upgrading pip in $(VENV)"
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@echo "make: installing $(TORCH_SPEC) (a CPU build where one lies on disk; else torch>=2.4)"
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q "torch>=2.4"
	@echo "make: installing topo (editable) with its test and dev tools: pytest, hypothesis, ruff, mypy"
	$(BIN)/pip install -q -e ".[test,dev]"
	@touch $(STAMP)
	@echo "make: $(VENV) is ready"

demo: $(STAMP)
	$(BIN)/topo bench

test: $(STAMP)
	$(BIN)/python -m pytest

# The contract with the real cupy (no GPU needed): installs the `nccl` extra into the venv (CI
# runs it after `make test`; the two README commands never install the GPU wheels).
contract: $(STAMP)
	@echo "make: installing the nccl extra (cupy-cuda12x, nvidia-nccl-cu12) for the contract test"
	$(BIN)/pip install -q -e ".[nccl]"
	TOPO_REQUIRE_CUPY=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_cupy_contract.py

lint: $(STAMP)
	$(BIN)/ruff check topo tests benchmarks examples
	$(BIN)/mypy topo

plan: $(STAMP)
	$(BIN)/topo plan dp=2 pp=2 tp=2 --rank 5 --ranks-per-node 4

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
