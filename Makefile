# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# A CUDA build of PyTorch plus the machine's nvcc compile the CUDA kernels even without a GPU.
export CUDA_HOME ?= /usr/local/cuda
JOBS   ?= 2

.PHONY: venv build test demo bench clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Editable install: compiles tonno_fast._C in place against the venv's torch.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q -n $(JOBS) tests

demo: build
	$(PY) -m tonno_fast.demo

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-columns=median,iqr,rounds

clean:
	rm -rf build *.egg-info $(VENV) tonno_fast/*.so
