#!/usr/bin/env bash
# One GPU session in one command (GPU time is scarce): build the CUDA library for
# sm_90, run the test suite's CUDA cases, then every benchmark on the GPU.
#   [DLOPT_TRY_MALFORMED=1] bash tools/gpu_check.sh OUTDIR [TEST_SECONDS] [BENCH_SECONDS]
# Writes env.txt, build.log, tests.log and the benchmark JSON into OUTDIR.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
TEST_S=${2:-180}
BENCH_S=${3:-150}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 DLOPT_BUILD_CUDA=1 DLOPT_CUDA_ARCH=90
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys,torch,triton;print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
  nvcc --version | tail -1; git rev-parse HEAD 2>/dev/null; } | tee "$OUT/env.txt"
if ! python3 -m pip install --no-build-isolation --no-deps -q -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m dlopt_kernels.cli info | tee -a "$OUT/env.txt"
# Known: malformed-list refusals crashed inside the CUDA library (docs/compat.md); the
# checks now run in g++-compiled host code, which should fix it, unverified on a GPU so
# far. They stay deselected from the main run so one crash does not end the session; the
# next GPU run should set DLOPT_TRY_MALFORMED=1, which runs them first in a process of
# their own, and drop the deselection once they pass.
if [ "${DLOPT_TRY_MALFORMED:-0}" = 1 ]; then
  timeout 120 python3 -m pytest tests -q -p no:cacheprovider -k "cuda and inconsistent_lists" \
    2>&1 | tee "$OUT/malformed.log" | tail -15
  echo "malformed-list tests: exit ${PIPESTATUS[0]}"
fi
timeout "$TEST_S" python3 -m pytest tests -q -p no:cacheprovider -k "cuda and not inconsistent_lists" \
  2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests done: $(( $(date +%s) - t0 )) s"
timeout "$BENCH_S" python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/bench.log" | tail -80
import sys
from dlopt_kernels import bench
for name in sorted(set(bench.BENCHMARKS.values())):
    alias = next(k for k, v in bench.BENCHMARKS.items() if v == name)
    try:
        bench.run(alias, out=sys.argv[1], progress=False, device="cuda")
    except Exception as exc:  # keep going: one broken bench must not cost the others
        print(f"BENCH {alias} FAILED: {type(exc).__name__}: {exc}")
PY
echo "total: $(( $(date +%s) - t0 )) s"
