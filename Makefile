# Two entry points: `make demo` (train the quick recipe, write a sample grid) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is a CPU build on the reference machine. On a CPU-only Linux machine elsewhere,
# avoid the multi-GB CUDA wheel with: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG ?= configs/quick.yaml
# optional extras installed by `make install` (notebook: the test that executes the notebook;
# bench: diffusers, for the baseline-recipe tests, so no test skips)
EXTRAS ?= dev,demo,notebook,bench
RUN ?= runs/quick

.PHONY: install demo test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/mnistdiff data --out $(RUN)/real_digits.png
	$(BIN)/mnistdiff train --config $(CONFIG) --run-dir $(RUN) --resume auto
	$(BIN)/mnistdiff sample --checkpoint $(RUN) --per-class 8 --out $(RUN)/samples.png

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
