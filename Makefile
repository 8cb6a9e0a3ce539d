# `make demo` and `make test` work on a fresh machine: each creates .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast env clean

env: $(STAMP)

# torch goes in first and alone: any later resolve that does not see torch==2.13.0 pulls CUDA wheels.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -r requirements.txt
	@$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else 'torch was changed to ' + torch.__version__ + '; expected 2.13.0')"
	@! $(PIP) list 2>/dev/null | grep -i -E '^(nvidia-|triton)' || (echo "CUDA packages were pulled into the CPU environment" && false)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py --outdir=demo-out

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q tests

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) demo-out
