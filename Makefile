# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 2
export CUDA_VISIBLE_DEVICES ?=

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

DEMO_DIR ?= demo_out/knee

# The quick start: trains the knee phantom model on CPU (resuming if DEMO_DIR has a
# checkpoint), then evaluates it on held-out phantom volumes and prints the summary tables.
demo: $(STAMP)
	$(PY) -m imask_jax.main --config experiments/phantom_knee.py --workdir $(DEMO_DIR)
	$(PY) -m imask_jax.evaluate --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) demo_out
