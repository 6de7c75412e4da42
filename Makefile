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
ASAN_TESTS    ?= tests/ops tests/test_bad_inputs.py tests/test_fuzz.py tests/test_determinism.py
ASAN_EXAMPLES ?= 10

.PHONY: asan
asan: $(VENV)/.deps
	TONNO_FAST_NO_CUDA=1 MAX_JOBS=$(JOBS) CFLAGS="$(ASAN_FLAGS)" LDFLAGS="$(ASAN_FLAGS)" \
		$(PY) setup.py -q build_ext --build-temp $(ASAN_DIR)/tmp --build-lib $(ASAN_DIR)/lib
	rm -rf $(ASAN_DIR)/stage && mkdir -p $(ASAN_DIR)/stage
	cp -r tonno_fast tests pyproject.toml $(ASAN_DIR)/stage/
	find $(ASAN_DIR)/stage \( -name '*.so' -o -name '*.pyc' \) -delete
	cp $(ASAN_DIR)/lib/tonno_fast/_C*.so $(ASAN_DIR)/stage/tonno_fast/
	cd $(ASAN_DIR)/stage && \
	export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 TONNO_FAST_NO_CUDA=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 TONNO_FUZZ_EXAMPLES=$(ASAN_EXAMPLES) && \
	$(abspath $(PY)) -c 'import tonno_fast, tonno_fast._C as c; assert "$(ASAN_DIR)/stage" in c.__file__, c.__file__; \
		assert tonno_fast.backends()["cpu"] == "available", tonno_fast.backends()["cpu"]' && \
	$(abspath $(PY)) -m pytest -q -p no:cacheprovider -n $(JOBS) -k "not triton" $(ASAN_TESTS)
