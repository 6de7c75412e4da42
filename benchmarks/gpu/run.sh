#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU where python3 + torch (+ triton) are installed and there is no
# network: build the extension in place for the detected GPU, run the CUDA (and Triton) tests, run
# compute-sanitizer memcheck on every kernel, then benchmark every op against the reference backend.
#
#   bash benchmarks/gpu/run.sh            # from anywhere; results also go to $OUT/gpu_results.md if OUT is set
#
# Environment: PYTHON (default python3), CUDA_HOME (default: from nvcc in PATH, else /usr/local/cuda),
# TONNO_FAST_CUDA_ARCH (default: the detected GPU's compute capability), MAX_JOBS (default: number of cores),
# BENCH_ARGS (extra arguments for bench.py, e.g. "--quick"). The whole run is kept under 8 minutes: every
# step gets a `timeout` no longer than the time left. The exit status is non-zero if any step failed; later
# steps still run.
set -uo pipefail

cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL_S=${TOTAL_S:-470}            # leave ~10 s of the 8 minutes for start-up and the summary
LOG=${OUT:-/tmp/tonno_fast_gpu_run}
mkdir -p "$LOG"
FAILED=()

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# step NAME CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, time left), log to $LOG/NAME.log.
step() {
  local name=$1 cap=$2; shift 2
  local t; t=$(left)
  (( t > cap )) && t=$cap
  if (( t < 10 )); then
    echo "== $name: skipped (out of time)"; FAILED+=("$name(no time)"); return 1
  fi
  echo "== $name (timeout ${t}s): $*"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s; log: $LOG/$name.log"
  if (( rc != 0 )); then
    tail -n 40 "$LOG/$name.log"; FAILED+=("$name(rc=$rc)")
  fi
  return $rc
}

# 0. The GPU, and the architecture to compile for (no fat binary: the build must be quick).
if ! ARCH=$("$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')"); then
  echo "no usable CUDA device / torch here"; exit 1
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')"
if [[ -z "${CUDA_HOME:-}" ]]; then
  if command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || echo "warning: no nvcc in $CUDA_HOME/bin: the CUDA kernels cannot be built (set CUDA_HOME)"
export TONNO_FAST_CUDA_ARCH=${TONNO_FAST_CUDA_ARCH:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TONNO_FAST_NO_CUDA
# tests/conftest.py defaults TRITON_INTERPRET to 1 (CPU CI); here Triton must compile for the GPU.
export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null || \
  echo "warning: ninja not found: the extension compiles one file at a time (slower)"

# 1. Build tonno_fast._C in place (no pip, no network).
step build 300 "$PY" setup.py build_ext --inplace
"$PY" -c "import tonno_fast._C as C; print('build_info:', C.build_info())" || FAILED+=("import")

# 2. Tests on the GPU: every op test of the CUDA and Triton implementations (tests/ops, marked cuda/triton), and
#    the deterministic adjoints (tests/test_determinism.py: atomic vs deterministic path, chunking).
step tests 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops tests/test_determinism.py -m "cuda or triton"
grep -E "passed|failed|error|skipped" "$LOG/tests.log" | tail -n 1

# 3. compute-sanitizer memcheck on a small case of every kernel.
SANITIZER=$(command -v compute-sanitizer || true)
[[ -z "$SANITIZER" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
if [[ -n "$SANITIZER" ]]; then
  step memcheck 120 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" benchmarks/gpu/sanitize_ops.py
  grep -E "ERROR SUMMARY|every CUDA kernel ran" "$LOG/memcheck.log" | tail -n 2
else
  echo "== memcheck: compute-sanitizer not found (looked in PATH and $CUDA_HOME/bin), skipped"
fi

# 4. Benchmarks (reference, cuda, and triton when available): every op forward, and every adjoint with the atomic
#    scatters and in deterministic mode (--backward).
MD=()
[[ -n "${OUT:-}" ]] && MD=(--markdown "$OUT/gpu_results.md")
# shellcheck disable=SC2086
step bench 240 "$PY" benchmarks/gpu/bench.py --backward ${MD[@]+"${MD[@]}"} ${BENCH_ARGS:-} && cat "$LOG/bench.log"

# 5. The three pipelines end to end with a ResNet-18 under bf16 autocast, split into slicing / encoder /
#    reconstruction.
step pipelines 90 "$PY" benchmarks/test_bench_pipeline.py --device cuda --model resnet18 --autocast bf16 \
  && cat "$LOG/pipelines.log"

echo "== total $(( $(date +%s) - START ))s"
if (( ${#FAILED[@]} )); then
  echo "FAILED: ${FAILED[*]}"; exit 1
fi
echo "all steps passed"
