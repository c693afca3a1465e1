#!/usr/bin/env bash
# A follow-up GPU call (after tools/gpu_check.sh found problems): build, a native
# backtrace of the malformed-list crash (no gdb there: tools/segv_backtrace.c), the CUDA
# tests again, then the benchmarks named.
#   bash tools/gpu_recheck.sh OUTDIR TEST_SECONDS BENCH_SECONDS bench...
set -uo pipefail
OUT=${1:?usage: gpu_recheck.sh OUTDIR TEST_SECONDS BENCH_SECONDS bench...}
TEST_S=$2; BENCH_S=$3; shift 3
: "${DLOPT_GIT_COMMIT:?set DLOPT_GIT_COMMIT to the commit sent (git rev-parse HEAD here)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 DLOPT_BUILD_CUDA=1 DLOPT_CUDA_ARCH=90 TRITON_INTERPRET=0
export DLOPT_BENCH_BUDGET_S=${DLOPT_BENCH_BUDGET_S:-2.5}
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -q -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
{ g++ --version | head -1
  python3 -c "import torch; print('torch cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
  ldd dlopt_kernels/_C*.so | grep -E "^dlopt|stdc|gcc_s"
  gcc -shared -fPIC -O1 -o /tmp/segv.so tools/segv_backtrace.c
  for d in cpu cuda; do
    LD_PRELOAD=/tmp/segv.so timeout 60 python3 tools/repro_malformed.py $d 2>&1 | python3 tools/symbolize.py
    echo "repro $d: exit ${PIPESTATUS[0]}"
  done; } >"$OUT/crash.log" 2>&1
head -c 5000 "$OUT/crash.log"
timeout "$TEST_S" python3 -m pytest tests -q -p no:cacheprovider -n 12 --timeout 120 -rfE \
  --tb=short -k "cuda or test_build" >"$OUT/tests.log" 2>&1
echo "tests: exit $? at $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | cut -c1-150 | tail -30
tb=$(date +%s)
for b in "$@"; do
  rem=$(( BENCH_S - ($(date +%s) - tb) ))
  [ "$rem" -gt 10 ] || { echo "BENCH $b SKIPPED: bench time used up"; continue; }
  f=benchmarks/bench_optim_$b.py; [ -f "$f" ] || f=benchmarks/bench_$b.py
  timeout "$rem" python3 "$f" --device cuda --out "$OUT" --no-progress >>"$OUT/bench.log" 2>&1
  echo "bench $b: exit $? at $(( $(date +%s) - t0 )) s"
done
echo "total: $(( $(date +%s) - t0 )) s"
