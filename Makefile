# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 2

# cpu (the default: what CI and the README's timings use), or a jax extra such as cuda13 or
# cuda12: `make install JAX_ACCELERATOR=cuda13` adds jax[cuda13] at requirements.txt's jax
# version (NVIDIA's pip wheels: only the driver is needed). The stamp records the accelerator
# (an empty stamp, made before this variable, means cpu): naming another one reinstalls.
JAX_ACCELERATOR ?= cpu
JAX_VERSION = $(shell sed -n 's/^jax==//p' requirements.txt)
INSTALLED := $(or $(file < $(STAMP)),cpu)
ifneq ($(JAX_ACCELERATOR),$(INSTALLED))
.PHONY: $(STAMP)
endif
# The CPU default hides any GPU, as it always has; an accelerator leaves the GPUs visible.
ifeq ($(JAX_ACCELERATOR),cpu)
export CUDA_VISIBLE_DEVICES ?=
endif

.PHONY: install test test-fast lint format demo hip bench clean knee-model

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
# Leaving an accelerator: remove its plugin, or jax in .venv would go on using it.
	$(if $(filter-out cpu $(JAX_ACCELERATOR),$(INSTALLED)),$(PY) -m pip uninstall --quiet --yes jax-$(INSTALLED)-plugin jax-$(INSTALLED)-pjrt)
ifneq ($(JAX_ACCELERATOR),cpu)
	$(PY) -m pip install --quiet "jax[$(JAX_ACCELERATOR)]==$(JAX_VERSION)"
endif
	$(PY) -m pip install --quiet --no-deps -e .
	echo $(JAX_ACCELERATOR) > $(STAMP)

# Test workers (pytest-xdist), a test file on one worker so that its module-scoped models
# compile once, files in the order tests/conftest.py sets (long runs first): two for CI's two
# cores; TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
TEST_ARGS = -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The whole suite: what CI runs.
test: $(STAMP)
	$(PY) -m pytest $(TEST_ARGS)

# The quick tier for the edit-test loop: everything but the end-to-end runs (marked e2e: those
# that train a model) and the slow unit tests (marked slow: 3 s or more each).
test-fast: $(STAMP)
	$(PY) -m pytest $(TEST_ARGS) -m "not e2e and not slow"

# Lint (ruff check) and formatting (ruff format --check); settings in ruff.toml.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The benchmarks that need nothing beyond .venv (benchmarks/train_step.py and the torchvision
# columns of roi_align.py need the torch environment described in benchmarks/README.md).
bench: $(STAMP)
	$(PY) benchmarks/surface_metrics.py
	$(PY) benchmarks/nms.py
	$(PY) benchmarks/roi_align.py --no_torch
	$(PY) benchmarks/input_pipeline.py

DEMO_DIR ?= demo_out/knee

# The quick start: trains the knee phantom model on CPU (resuming if DEMO_DIR has a
# checkpoint), then evaluates it on held-out phantom volumes and prints the summary tables.
demo: $(STAMP)
	$(PY) -m imask_jax.main --config experiments/phantom_knee.py --workdir $(DEMO_DIR)
	$(PY) -m imask_jax.evaluate --workdir $(DEMO_DIR)

HIP_DIR ?= demo_out/hip

# The hip effusion experiment (the README's hip section): trains on hip phantoms, then
# evaluates on held-out ones (effusion Dice, surface distances, volumes beside the readers').
hip: $(STAMP)
	$(PY) -m imask_jax.main --config experiments/phantom_hip.py --workdir $(HIP_DIR)
	$(PY) -m imask_jax.evaluate --workdir $(HIP_DIR)

KNEE_DATA ?= data/knee_general/varied
KNEE_RUN ?= workdirs/knee_general
KNEE_MODEL ?= models/knee_general

# The general knee model (issue 36; models/knee_general/MODEL_CARD.md): writes 40 knee
# phantoms of the varied shape family at 140 mm / 0.5 mm, trains experiments/knee_general.py on
# them (contrast randomisation on; resumes if KNEE_RUN has a checkpoint), then copies what
# predict --workdir needs into KNEE_MODEL: config.json, the last checkpoint's variables
# (without the optimiser's state: imask_jax/inference/export.py), the training record and the
# quality flags' training reference (so predict needs no training data).
knee-model: $(STAMP)
	$(PY) -m data_pipelines.phantoms knee --shape-family varied --num 40 --seed 1000 \
	    --fov 140 --spacing 0.5 --out $(KNEE_DATA)
	$(PY) -m imask_jax.main --config experiments/knee_general.py:data=$(KNEE_DATA) --workdir $(KNEE_RUN)
	rm -rf $(KNEE_MODEL)/checkpoints $(KNEE_MODEL)/training_reference.json $(KNEE_MODEL).export
	$(PY) -m imask_jax.inference.export --workdir $(KNEE_RUN) --out $(KNEE_MODEL).export
	mkdir -p $(KNEE_MODEL)
	mv $(KNEE_MODEL).export/* $(KNEE_MODEL)/
	rm -rf $(KNEE_MODEL).export $(KNEE_MODEL)/training_reference.json
	$(PY) -c "import sys; from imask_jax import workdir as w; from imask_jax.predict import quality; \
	    from data_pipelines.tissues import LabelScheme; d = sys.argv[1]; c = w.load_config(d); \
	    print(quality.training_reference(d, c, w.data_dir_for(c, d), \
	    LabelScheme.from_config(c).names_by_merged_value)[1])" $(KNEE_MODEL)

clean:
	rm -rf $(VENV) demo_out
