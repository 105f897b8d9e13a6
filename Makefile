# Two commands do all the set-up on a fresh machine (Python 3.11 with venv):
#   make demo   the whole workflow on the bundled digits data, on the CPU
#   make test   lint and the test suite
# Both create .venv on first use (PyTorch comes from pip: about 2 minutes).

VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test lint clean-demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,slurm]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/snakemake --cores $(CORES) --config scale=demo

lint: $(VENV)/.installed
	$(BIN)/ruff check ntkcl tests benchmarks workflow/scripts
	$(BIN)/ruff format --check ntkcl tests benchmarks workflow/scripts
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1

test: lint
	$(BIN)/pytest

clean-demo:
	rm -rf results/demo
