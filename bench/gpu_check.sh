#!/usr/bin/env bash
# Build, test and benchmark the CUDA kernels on a GPU machine in one bounded run (no network
# needed): a Python with torch (CUDA), pybind11, pytest, hypothesis, CMake, ninja and nvcc.
#
#   bash bench/gpu_check.sh                 # build for the local GPU, test, bench, summary
#   DEADLINE=480 PYTHON=python3 bash bench/gpu_check.sh
#
# The build is a plain CMake build into build/gpu (no pip install, so a read-only Python
# environment works); the tests and benches import it through PYTHONPATH=python.
# C++ tests: GoogleTest is found as an installed package, or built first from a source tree
# in .gtest/ (copy Debian's /usr/src/googletest there on a machine that has libgtest-dev;
# .gtest/ is git-ignored, so name it in whatever carries the tree to the GPU machine).
# The CUDA C++ tests also run under compute-sanitizer (memcheck, racecheck) when it is found.
# Every step gets at most the time left before DEADLINE seconds (default 540); a step that
# would start with under 20 s left is skipped. With $OUT set, the log is also written there.
# Each op adds its C++ test binary to CPP_TESTS and its bench script to the bench steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
export PYTHONUNBUFFERED=1

CPP_TESTS=(test_common test_selective_scan test_quadtree_index test_quad_scan)
status=0
summary=()
step() {  # step NAME LIMIT COMMAND...: runs under a timeout, records PASS/FAIL/SKIP with the time
  # (exit status 77 from COMMAND: SKIP, the tool cannot run here)
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then summary+=("SKIP  $name (deadline)"); status=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS rc=0
  echo "=== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then summary+=("PASS  $name ($((SECONDS - start)) s)")
  elif [ "$rc" -eq 77 ]; then summary+=("SKIP  $name (the tool cannot run on this machine)")
  else summary+=("FAIL  $name ($((SECONDS - start)) s)"); status=1; fi
}

# sanitize TOOL BINARY: the CUDA cases of a C++ test under compute-sanitizer; exit status 77
# where the sanitizer refuses the device (some sandboxed GPU runtimes: "Device not supported").
sanitize() {
  local log
  log=$(mktemp)
  "$sanitizer" --tool "$1" --error-exitcode 1 "$2" --gtest_filter='*Cuda*' --gtest_brief=1 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && grep -q "Device not supported" "$log"; then rc=77; fi
  rm -f "$log"
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')") || arch=90
echo "local CUDA architecture: sm_$arch; $("$PY" -c 'import torch; print("torch", torch.__version__)')"

cmake_args=(-G Ninja -DQUADMAMBA_PYTHON=ON -DQUADMAMBA_CUDA=ON -DQUADMAMBA_TESTS=AUTO
            "-DCMAKE_CUDA_ARCHITECTURES=$arch" "-Dpybind11_DIR=$("$PY" -m pybind11 --cmakedir)"
            "-DPython_EXECUTABLE=$(command -v "$PY")")
if [ -d .gtest/googletest ]; then
  step gtest-build 120 bash -c "cmake -S .gtest -B /tmp/qm-gtest-build -G Ninja -DBUILD_GMOCK=OFF \
    -DCMAKE_INSTALL_PREFIX=/tmp/qm-gtest >/dev/null && cmake --build /tmp/qm-gtest-build >/dev/null \
    && cmake --install /tmp/qm-gtest-build >/dev/null"
  cmake_args+=(-DCMAKE_PREFIX_PATH=/tmp/qm-gtest)
fi
step build 300 bash -c "cmake -S . -B build/gpu ${cmake_args[*]} && cmake --build build/gpu -j$(nproc) \
  && cp build/gpu/_C*.so python/quadmamba/"
export PYTHONPATH=$PWD/python QUADMAMBA_CPP_TEST_DIR=$PWD/build/gpu/cpp_tests
step cuda-available 60 "$PY" -c "import quadmamba, sys; s = quadmamba.cuda_status(); print(s); sys.exit(0 if s['usable'] else 1)"

for t in "${CPP_TESTS[@]}"; do
  if [ -x "build/gpu/cpp_tests/$t" ]; then step "cpp $t" 120 "build/gpu/cpp_tests/$t" --gtest_brief=1
  else summary+=("SKIP  cpp $t (not built: no GoogleTest; see the header)"); fi
done
step pytest-cuda 240 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/ops tests/models

# Out-of-bounds accesses and shared-memory races in the CUDA kernels, on the C++ tests' small
# shapes (CPU against CUDA, every chunk boundary).
sanitizer=$(command -v compute-sanitizer)
for d in "$(dirname "$(readlink -f "$(command -v nvcc)" 2>/dev/null)")" /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
  [ -z "$sanitizer" ] && [ -x "$d/compute-sanitizer" ] && sanitizer=$d/compute-sanitizer
done
if [ -n "$sanitizer" ]; then
  export sanitizer
  export -f sanitize  # run by `timeout` in a child bash
  for t in test_selective_scan test_quad_scan; do
    [ -x "build/gpu/cpp_tests/$t" ] || continue
    for tool in memcheck racecheck; do
      step "$tool $t" 90 bash -c 'sanitize "$@"' _ "$tool" "build/gpu/cpp_tests/$t"
    done
  done
else
  summary+=("SKIP  compute-sanitizer (not found)")
fi

step "bench selective_scan" 120 "$PY" bench/bench_selective_scan.py --device cuda
step "bench quad_scan" 90 "$PY" bench/bench_quad_scan.py --device cuda
step "bench model" 180 "$PY" bench/bench_model.py --device cuda --variants t s --batches 1 16 --iters 3 \
  --max-seconds 20

echo
echo "=== summary (${SECONDS} s)"
printf '%s\n' "${summary[@]}"
exit $status
