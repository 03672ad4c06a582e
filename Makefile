# The README's two commands.  Both create .venv and install on first use, and are
# quick when the install is already current (a stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ctredge-installed
EXTRAS ?= train,cpu,serve,bench,baselines,dev
RUN_OUT ?= runs/demo

.PHONY: run test install clean

run: $(STAMP)
	$(PY) -m ctredge.cli pipeline --out $(RUN_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
