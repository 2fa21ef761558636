PYTHON ?= python3

.PHONY: setup test lint bench

# CPU torch first: a plain `pip install torch` pulls several GB of CUDA packages.
setup:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check src tests benchmarks

bench:
	$(PYTHON) benchmarks/kernels.py
