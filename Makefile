# Two commands on a fresh machine:  make demo  (phantom study -> workflow -> accuracy table)
#                                   make test  (the test suite)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,slurm]'
	touch $@

install: $(VENV)/.installed

DEMO_CONFIG := config/demo/config.yaml

demo: install
	$(BIN)/python -m msifusion phantom demo --preset demo --seed 0
	$(BIN)/snakemake --profile profiles/local --configfile $(DEMO_CONFIG)
	@echo
	@echo "Fused vs bicubic ion images against the phantom's ground truth (Pearson r on tissue):"
	@$(BIN)/python -m msifusion evaluate results/evaluation.tsv

test: install
	$(BIN)/python -m pytest -q

demo/sections.tsv: | install
	$(BIN)/python -m msifusion phantom demo --preset demo --seed 0

# the template config/config.yaml lists no sections yet: lint the workflow on the demo study
lint: install demo/sections.tsv
	$(BIN)/snakemake --lint --configfile $(DEMO_CONFIG)

clean:
	rm -rf results logs demo .snakemake
