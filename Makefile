# Set-up and experiments. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LRX := $(BIN)/lrx
# The torch and torchvision lrx's results were made with; any torch >= 2.4 works: make install TORCH_PINS="torch torchvision".
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
QUICK := $(sort $(wildcard configs/quick/exp[0-9]*.yaml))
SEED := $(sort $(wildcard configs/exp0*.yaml))
SPEED := $(sort $(wildcard configs/exp1*.yaml))

.PHONY: install data test demo docs export-check all-experiments speed-experiments results bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test,export]'  # export: onnx, onnxscript, onnxruntime, so their tests run
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest

# Fashion-MNIST for the demo, from the first place that has it: data/, Debian's dataset-fashion-mnist
# (installed here when we are root and apt works), torchvision's download; else one line on what to do.
data: install
	@if $(BIN)/python -c "from lrx.data.datasets import load_split; from pathlib import Path; [load_split('fashion-mnist', Path('data'), s, False) for s in ('train', 'test')]" 2>/dev/null; then \
	    echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } >/dev/null 2>&1; then \
	    echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist"; \
	elif $(BIN)/python -c "from lrx.data.datasets import load_split; from pathlib import Path; [load_split('fashion-mnist', Path('data'), s, True) for s in ('train', 'test')]"; then \
	    echo "Fashion-MNIST: downloaded into data/"; \
	else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian, Ubuntu) or put the four *-ubyte.gz files from github.com/zalandoresearch/fashion-mnist into data/fashion-mnist/"; exit 2; \
	fi

# Every quick row at CPU size on Fashion-MNIST (the nine seed rows, then the rows beyond the seed),
# then the whole table into results/quick.md (docs/results.md shows it).
demo: data
	$(LRX) run $(QUICK) --runs-dir runs/quick
	$(LRX) table runs/quick > results/quick.md
	cat results/quick.md

# docs/configs.md: every config key, its default and allowed values, from lrx/config/settings.py's dataclasses.
docs: install
	$(BIN)/python -m lrx.config.reference > docs/configs.md.tmp
	mv docs/configs.md.tmp docs/configs.md

# Every finished quick row's final model in all four export formats, loaded without lrx and compared with
# PyTorch (PASS within 1e-4); exit 1 on any failure. After `make demo`.
export-check: install
	$(BIN)/python benchmarks/export_check.py --runs-dir runs/quick --out results/export-check.md

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
	$(BIN)/python benchmarks/datafit_speed.py

clean:
	rm -rf $(VENV) runs/quick
