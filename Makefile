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

demo: $(STAMP)
	$(PY) -m data_pipelines.phantoms knee --num 3 --seed 0 --out demo_out/phantom_knee --preview demo_out/phantom_knee/preview.png

clean:
	rm -rf $(VENV) demo_out
