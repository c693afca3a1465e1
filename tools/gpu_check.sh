#!/usr/bin/env bash
# One GPU session in one command (GPU time is scarce): build the CUDA library for
# sm_90, run every benchmark on the GPU (each in its own process, so one crash costs
# one benchmark), then the test suite's CUDA cases.
#   DLOPT_GIT_COMMIT=<sha> bash tools/gpu_check.sh OUTDIR [TEST_SECONDS] [BENCH_SECONDS] [CASE_SECONDS]
# (the lease's copy of .git was seen to be stale: name the commit sent, for the JSON)
# Writes env.txt, build.log, bench.log, tests.log and the benchmark JSON into OUTDIR.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
: "${DLOPT_GIT_COMMIT:?set DLOPT_GIT_COMMIT to the commit sent (git rev-parse HEAD here)}"
TEST_S=${2:-170}
BENCH_S=${3:-240}  # the eight took about 200 s on an H200 at 2.5 s a case
export DLOPT_BENCH_BUDGET_S=${4:-2.5}
mkdir -p "$OUT"
# TRITON_INTERPRET=0: Triton compiles for the GPU (tests/conftest.py sets 1 by default,
# which would run even CUDA tensors through the interpreter).
export PYTHONUNBUFFERED=1 MAX_JOBS=16 DLOPT_BUILD_CUDA=1 DLOPT_CUDA_ARCH=90 TRITON_INTERPRET=0
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
t0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - $2) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import sys,torch,triton;print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
  nvcc --version | tail -1; echo "commit $DLOPT_GIT_COMMIT"; } | tee "$OUT/env.txt"
if ! python3 -m pip install --no-build-isolation --no-deps -q -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m dlopt_kernels.cli info 2>&1 | tee -a "$OUT/env.txt"
tb=$(date +%s)
# issue 3's target first; each benchmark merges its section into OUT/<device>-<date>.json
for b in adam lamb lion sgd adagrad rmsprop adafactor multi_tensor_norm; do
  rem=$(left "$BENCH_S" "$tb")
  [ "$rem" -gt 10 ] || { echo "BENCH $b SKIPPED: bench time used up"; continue; }
  f=benchmarks/bench_optim_$b.py; [ -f "$f" ] || f=benchmarks/bench_$b.py
  timeout "$rem" python3 "$f" --device cuda --out "$OUT" --no-progress >>"$OUT/bench.log" 2>&1
  echo "bench $b: exit $? at $(( $(date +%s) - t0 )) s"
done
grep -E "^\[|^  dlopt\[(cuda|triton)\] |BENCH|Traceback|Error" "$OUT/bench.log" | cut -c1-100 | tail -45
timeout "$TEST_S" python3 -m pytest tests -q -p no:cacheprovider -n 12 --timeout 120 -rfE \
  --tb=short --durations=10 -k "cuda or test_build" \
  >"$OUT/tests.log" 2>&1
echo "tests: exit $? at $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -40
echo "total: $(( $(date +%s) - t0 )) s"
