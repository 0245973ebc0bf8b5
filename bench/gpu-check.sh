#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with an NVIDIA GPU (no Node needed):
# configures and builds build-gpu with the CUDA backend and the tests, runs every ctest test (the
# CPU kernels' and the CUDA kernels'; a CUDA test that finds no device fails here, through
# MAMBA_SSM_REQUIRE_GPU=1), then the benchmarks bench_cuda (kernels) and bench_cuda_model (the model
# runner: decode and prefill tokens/s). Logs go to $OUT when it is set. Exits non-zero if anything
# fails. GPU_CHECK_CUDA_ONLY=1 builds only the CUDA targets and skips the CPU tests (which need no GPU
# and run in CI anyway), to save device time. GPU_CHECK_BENCHES names the benchmarks to run (default
# "bench_cuda bench_cuda_model"; empty: none).
#
# With Node (on PATH, at $NODE, or carried as .node-bin/node.xz) and the project's node_modules (present,
# or carried as .node-bin/node_modules.tar.xz; scripts/gpu-carry.sh makes both files), the same build
# also makes the Node addon with the CUDA backend (build-gpu/mamba_ssm.node), and jest runs
# test/cuda.test.ts against it: the GPU model against the CPU model from TypeScript; then
# `bench/generate.ts --device cuda --quick` times generation from Node on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-build-gpu/logs}"
mkdir -p "$LOG_DIR" build-gpu
export MAMBA_SSM_REQUIRE_GPU=1
status=0

step() {  # step NAME COMMAND...: runs, tees its output to $LOG_DIR/NAME.log, records failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "=== $name FAILED (exit $rc)"; status=1; fi
  return "$rc"
}

nvidia-smi -L 2>&1 | tee "$LOG_DIR/nvidia-smi.log" || { echo "=== nvidia-smi failed"; status=1; }

NODE_BIN="${NODE:-}"
if [ -z "$NODE_BIN" ] && [ -f .node-bin/node.xz ]; then
  xz -dc .node-bin/node.xz > .node-bin/node && chmod +x .node-bin/node && NODE_BIN=$PWD/.node-bin/node
fi
if [ -z "$NODE_BIN" ] && command -v node >/dev/null; then NODE_BIN=$(command -v node); fi
if [ -n "$NODE_BIN" ] && [ ! -d node_modules ] && [ -f .node-bin/node_modules.tar.xz ]; then
  tar -xJf .node-bin/node_modules.tar.xz
fi
ADDON_FLAGS=()
if [ -n "$NODE_BIN" ] && [ -d node_modules/node-addon-api ] && [ -d node_modules/jest ]; then
  export PATH="$(dirname "$NODE_BIN"):$PATH"  # CMakeLists.txt asks node where node-addon-api is
  ADDON_FLAGS=("-DCMAKE_JS_INC=$PWD/node_modules/node-api-headers/include;$PWD/node_modules/node-addon-api")
  echo "=== Node $("$NODE_BIN" --version): the addon and test/cuda.test.ts are built and run too"
else
  echo "=== no Node or no node_modules: the addon's GPU tests are not run"
fi

step configure cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DMAMBA_SSM_CUDA=ON -DMAMBA_SSM_TESTS=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DMSSM_CUDA_PTXAS_VERBOSE=ON "${ADDON_FLAGS[@]}" || exit 1
CUDA_ONLY="${GPU_CHECK_CUDA_ONLY:-0}"
if [ "$CUDA_ONLY" = 1 ]; then
  targets=(mssm_cuda test_cuda_conv1d test_cuda_norm test_cuda_selective_scan test_cuda_ssd test_cuda_model
           test_cuda_moe test_cuda_scan_train test_cuda_sampling bench_cuda bench_cuda_model)
  if [ ${#ADDON_FLAGS[@]} -gt 0 ]; then targets+=(mamba_ssm); fi
  step build cmake --build build-gpu -j16 --target "${targets[@]}" || exit 1
else
  step build cmake --build build-gpu -j16 || exit 1
fi
if [ ! -x build-gpu/native/cuda/bench_cuda ]; then
  echo "=== the CUDA backend was not built (is nvcc on PATH?)"; exit 1
fi
step ctest-cuda bash -c "cd build-gpu && ctest -R '^test_cuda_' --no-tests=error --output-on-failure -j1"
if [ "$CUDA_ONLY" != 1 ]; then
  step ctest-cpu bash -c "cd build-gpu && ctest -E '^test_cuda_' --no-tests=error --output-on-failure -j8"
fi
if [ ${#ADDON_FLAGS[@]} -gt 0 ]; then
  step jest-cuda env MAMBA_SSM_BINARY=build-gpu/mamba_ssm.node "$NODE_BIN" --expose-gc node_modules/jest/bin/jest.js \
    --verbose test/cuda.test.ts
  step bench-generate-cuda env MAMBA_SSM_BINARY=build-gpu/mamba_ssm.node TS_NODE_PROJECT=tsconfig.test.json \
    TS_NODE_TRANSPILE_ONLY=1 timeout 600 "$NODE_BIN" -r ts-node/register bench/generate.ts --device cuda --quick
fi
for bench in ${GPU_CHECK_BENCHES-bench_cuda bench_cuda_model}; do
  step "$bench" timeout 300 "build-gpu/native/cuda/$bench"
done

if [ "$status" -eq 0 ]; then echo "=== gpu-check: all passed"; else echo "=== gpu-check: FAILED"; fi
exit "$status"
