PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo demo-domain clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# the whole suite (CI's command)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# the unit tier for the edit-test loop: no process, server, browser or real training
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipelines.main --profile demo

# the demo with leave-one-domain-out folds; after `make demo`, the report shows both protocols
demo-domain: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipelines.main --profile profiles/domain.yaml

clean:
	rm -rf $(VENV) mlruns mlflow.db demo_runs
