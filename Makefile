# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# A CUDA build of PyTorch plus the machine's CUDA toolkit compile the CUDA kernels even without a GPU. setup.py
# finds the toolkit (CUDA_HOME, else the real folder of the nvcc on PATH, else /usr/local/cuda) and builds the CPU
# kernels alone when there is none; TONNO_FAST_NO_CUDA=1 skips the CUDA kernels (minutes of compile time).
JOBS   ?= 2

.PHONY: venv build test demo bench clean sdist sdist-smoke

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Editable install: compiles tonno_fast._C in place against the venv's torch (and writes tonno_fast/_C.build.json).
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml tonno_fast/_extension.py $(shell find csrc -type f 2>/dev/null)
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
	rm -rf build dist *.egg-info $(VENV) tonno_fast/*.so tonno_fast/_C.build.json

# The source distribution users build from (`pip install --no-build-isolation dist/tonno_fast-*.tar.gz`). -I keeps
# the build/ folder of this tree (make asan's) from shadowing PyPI's `build` package.
sdist: $(VENV)/.deps
	$(PY) -I -c 'import build.__main__' 2>/dev/null || $(PIP) install -q build
	rm -f dist/tonno_fast-*.tar.gz
	$(PY) -I -m build --sdist --no-isolation --outdir dist .

# What a user does, checked from outside the source tree: the sdist pip-installed into a fresh venv holding only
# torch (and setuptools, ninja), compiled there (CPU kernels only, to keep CI time), then tests/install_smoke.py:
# backends(), the build record, the CLI, a small heatmap equal to the reference backend's.
# SMOKE_TORCH: the CPU wheel of torch in pip's local wheel folder when the machine has one (1.3 min to install,
# measured, against 2.9 min for torch==2.14.1 and its CUDA libraries), else the Makefile's pinned torch.
SMOKE_DIR   := build/sdist-smoke
PIP_LOCAL   := $(or $(PIP_FIND_LINKS),/opt/wheels)
PY_TAG      := $(shell $(PYTHON) -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
SMOKE_TORCH ?= $(firstword $(wildcard $(PIP_LOCAL)/torch-*+cpu-$(PY_TAG)-*.whl) torch==2.14.1)

sdist-smoke: sdist
	rm -rf $(SMOKE_DIR) && mkdir -p $(SMOKE_DIR)/run
	$(PYTHON) -m venv $(SMOKE_DIR)/venv
	$(SMOKE_DIR)/venv/bin/pip install -q "$(SMOKE_TORCH)" "setuptools>=77" ninja
	cd $(SMOKE_DIR)/run && TONNO_FAST_NO_CUDA=1 MAX_JOBS=$(JOBS) ../venv/bin/pip install -q --no-build-isolation \
		$(abspath $(wildcard dist/tonno_fast-*.tar.gz))
	cd $(SMOKE_DIR)/run && ../venv/bin/python -I $(abspath tests/install_smoke.py)

# Memory safety: the CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer into
# build/asan (the in-place tonno_fast/_C*.so of `make build` is not touched), then the op tests run against that
# build from a staged copy of the package. The flags reach every compile and link command through CFLAGS and
# LDFLAGS (setuptools appends them); -fno-wrapv undoes Python's -fwrapv so signed 32-bit index overflow is
# reported, and -fno-sanitize-recover makes any UB finding abort the run. libasan must be loaded before the
# (uninstrumented) interpreter starts, hence LD_PRELOAD, together with libstdc++ (else ASan cannot intercept
# __cxa_throw, which python does not link); Python's own allocations look like leaks, hence detect_leaks=0.
# Triton tests are deselected: they do not run our C++. TONNO_FAST_NO_CUDA=1 holds for the tests too: the sanitised
# build is CPU-only, so the check that a CUDA build holds every CUDA kernel does not apply.
ASAN_DIR      := build/asan
ASAN_FLAGS    := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -fno-wrapv -g
ASAN_TESTS    ?= tests/ops tests/test_bad_inputs.py tests/test_fuzz.py tests/test_determinism.py tests/test_cpu_pool.py
ASAN_EXAMPLES ?= 10

.PHONY: asan
asan: $(VENV)/.deps
	TONNO_FAST_NO_CUDA=1 MAX_JOBS=$(JOBS) CFLAGS="$(ASAN_FLAGS)" LDFLAGS="$(ASAN_FLAGS)" \
		$(PY) setup.py -q build_ext --build-temp $(ASAN_DIR)/tmp --build-lib $(ASAN_DIR)/lib
	rm -rf $(ASAN_DIR)/stage && mkdir -p $(ASAN_DIR)/stage
	cp -r tonno_fast tests pyproject.toml $(ASAN_DIR)/stage/
	find $(ASAN_DIR)/stage \( -name '*.so' -o -name '*.pyc' \) -delete
	cp $(ASAN_DIR)/lib/tonno_fast/_C*.so $(ASAN_DIR)/lib/tonno_fast/_C.build.json $(ASAN_DIR)/stage/tonno_fast/
	cd $(ASAN_DIR)/stage && \
	export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 TONNO_FAST_NO_CUDA=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 TONNO_FUZZ_EXAMPLES=$(ASAN_EXAMPLES) && \
	$(abspath $(PY)) -c 'import tonno_fast, tonno_fast._C as c; assert "$(ASAN_DIR)/stage" in c.__file__, c.__file__; \
		assert tonno_fast.backends()["cpu"] == "available", tonno_fast.backends()["cpu"]' && \
	$(abspath $(PY)) -m pytest -q -p no:cacheprovider -n $(JOBS) -k "not triton" $(ASAN_TESTS)
