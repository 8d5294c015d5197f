#!/usr/bin/env bash
# The collaboration kernels on a CUDA GPU in one go, for a machine lent for a few minutes:
# the CUDA kernel tests, then bench_logit_fusion.py and bench_latent_fusion.py, each under
# its own time limit (about 9.5 minutes in all). A log per step goes to $OUT (default
# ./gpu-out), the results JSON and the rewritten benchmarks/README.md to $OUT/results.tgz;
# the last lines printed are a summary.
#
#     bash benchmarks/gpu_check.sh                 # everything
#     STEPS="tests logit" bash benchmarks/gpu_check.sh
#
# It needs python3 with torch (CUDA), triton, pytest and hypothesis, nothing of the
# gateway's: the kernel tests run without the project's conftest (--noconftest), which
# imports the gateway's packages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-"tests logit pivots latent"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
summary=()

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.txt, note its exit status
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    summary+=("$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)")
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$OUT/env.txt"

step tests 120 "$PY" -m pytest -q -p no:cacheprovider --noconftest tests/kernels -k "on_cuda" -rs
step logit 170 "$PY" benchmarks/bench_logit_fusion.py
step pivots 50 "$PY" benchmarks/bench_logit_fusion.py --batch 64 --pivots 16 --no-readme
step latent 220 "$PY" benchmarks/bench_latent_fusion.py

# One archive for the results JSON and the rewritten README (a lent machine returns few files).
(cd benchmarks && tar czf "$OUT/results.tgz" README.md $(ls results/logit_fusion-*.json results/latent_fusion-*.json \
    2>/dev/null))
echo
echo "== gpu_check summary"
tail -n 3 "$OUT/env.txt"
printf '%s\n' "${summary[@]}"
grep -h "passed\|failed\|error" "$OUT/tests.txt" 2>/dev/null | tail -n 2
grep -h "B=  64" "$OUT/logit.txt" "$OUT/pivots.txt" 2>/dev/null
