# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Every target first creates .venv (once; later runs reuse it, and re-install when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

# Offline by default: no W&B account, no Hugging Face hub needed.
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-all demo notebooks bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

## The default suite: fast tests and the notebooks (slow tests excluded).
# pytest exits 5 when it collects nothing (e.g. no notebooks yet): not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS) tests || [ $$? -eq 5 ]
	LLAMA2_LIT_NOTEBOOK_SCALE=ci $(BIN)/python -m pytest --nbmake --nbmake-timeout=900 $(PYTEST_ARGS) notebooks || [ $$? -eq 5 ]

## Everything, slow tests included.
test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests || [ $$? -eq 5 ]
	LLAMA2_LIT_NOTEBOOK_SCALE=ci $(BIN)/python -m pytest --nbmake --nbmake-timeout=900 $(PYTEST_ARGS) notebooks || [ $$? -eq 5 ]

## The main job: the recipe end to end on the toy world (CPU, minutes).
demo: $(STAMP)
	$(BIN)/python -m llama2_lit demo --size micro --out runs/demo

## Execute every notebook in place, at the size a reader should see (the test targets run them small).
notebooks: $(STAMP)
	LLAMA2_LIT_NOTEBOOK_SCALE=full $(BIN)/python -m pytest --nbmake --nbmake-timeout=1800 --overwrite notebooks

## Speed against Hugging Face transformers (and TRL's RewardTrainer and PPOTrainer) on the same configs (ratios, not timed tests).
bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/reward_model.py
	$(BIN)/python benchmarks/ppo.py
	$(BIN)/python benchmarks/ppo.py --precision bf16

clean:
	rm -rf $(VENV) .pytest_cache runs wandb lightning_logs
