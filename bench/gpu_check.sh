#!/usr/bin/env bash
# Build, test and benchmark the CUDA kernels on a GPU machine (no network needed):
# Python 3.12, torch with CUDA, pybind11, scikit-build-core, cmake and ninja installed.
#   bash bench/gpu_check.sh            # build for the local GPU's architecture, test, bench
# Each op adds its C++ test binary to CPP_TESTS and its bench script to BENCHES.
set -uo pipefail
cd "$(dirname "$0")/.."

CPP_TESTS=(test_common test_selective_scan test_quadtree_index test_quad_scan)
BENCHES=(bench/bench_selective_scan.py bench/bench_quad_scan.py bench/bench_model.py)
status=0
summary=()
step() {  # step NAME COMMAND...: runs, records PASS/FAIL with the time taken
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*"
  if "$@"; then summary+=("PASS  $name ($((SECONDS - start)) s)")
  else summary+=("FAIL  $name ($((SECONDS - start)) s)"); status=1; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
arch=$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')")
echo "local CUDA architecture: sm_$arch"

export CMAKE_ARGS="-DQUADMAMBA_CUDA=ON -DQUADMAMBA_TESTS=AUTO -DCMAKE_CUDA_ARCHITECTURES=$arch"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-8}
step build pip install --no-build-isolation --no-deps -e . -v
step cuda-available python -c "import quadmamba, sys; print('cuda_available', quadmamba.cuda_available()); sys.exit(0 if quadmamba.cuda_available() else 1)"
step pytest-cuda python -m pytest -q -k cuda tests/ops tests/models

test_dir=$(ls -d build/*/cpp_tests 2>/dev/null | head -n1)
if [ -n "$test_dir" ]; then
  for t in "${CPP_TESTS[@]}"; do
    if [ -x "$test_dir/$t" ]; then step "cpp $t" "$test_dir/$t" --gtest_brief=1
    else summary+=("SKIP  cpp $t (not built: install libgtest-dev)"); fi
  done
else
  summary+=("SKIP  C++ tests (no build/*/cpp_tests: install libgtest-dev)")
fi

for b in "${BENCHES[@]}"; do
  step "bench $b" python "$b" --device cuda
done

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $status
