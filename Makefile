# Set-up and experiments. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LRX := $(BIN)/lrx
# torch 2.14.1 / torchvision 0.29.1 install from the local wheel cache on the dev machines (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
QUICK := $(sort $(wildcard configs/quick/exp0*.yaml))
QUICK_SPEED := $(sort $(wildcard configs/quick/exp1*.yaml))
SEED := $(sort $(wildcard configs/exp0*.yaml))
SPEED := $(sort $(wildcard configs/exp1*.yaml))

.PHONY: install test demo demo-speed all-experiments speed-experiments results bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest

# The nine seed rows at CPU size on Fashion-MNIST, then the table.
demo: install
	$(LRX) run $(QUICK) --runs-dir runs/quick
	$(LRX) table runs/quick | tee results/quick.md

# The scheme-2 rows at CPU size (issue: make low-rank expansion actually fast).
demo-speed: install
	$(LRX) run $(QUICK_SPEED) --runs-dir runs/quick
	$(LRX) table runs/quick | tee results/quick.md

# The nine seed rows at full scale (CIFAR-10 at 224; meant for a GPU). `lrx run` makes parents first.
all-experiments: install
	$(LRX) run $(SEED)
	$(LRX) table runs/ > RESULTS.md

speed-experiments: install
	$(LRX) run $(SPEED)
	$(LRX) table runs/ > RESULTS.md

results: install
	$(LRX) table runs/ > RESULTS.md

bench: install
	$(BIN)/python benchmarks/layer_speed.py
	$(BIN)/python benchmarks/finetune_speed.py

clean:
	rm -rf $(VENV) runs/quick
