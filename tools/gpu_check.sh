#!/usr/bin/env bash
# One call on a GPU machine (torch + triton preinstalled, no network): build the CUDA extension for this card,
# test the CUDA kernels, then the Triton kernels, at real ELIT sizes in bf16/fp16 (fp32 and tiny shapes are
# CI's job), check every compiled backend against the reference (known-answer), time every attention
# backend beside SDPA flash/cuDNN/efficient, torch.nn.attention.varlen and FlexAttention at Read/Write/core
# shapes (D 64/72/128, bf16, TFLOP/s), and time the XL/2 512px model (both presets).
#
#   bash tools/gpu_check.sh                # results in $OUT (default ./gpu_results)
#
# Budget: the whole script stops by GPU_CHECK_SECONDS (default 420 s; every stage runs under its own limit,
# cut to what is left), so a rerun fits a 15-minute GPU window with the machine start. A stage past its limit
# gets SIGINT (pytest still writes its junit XML) and the next stage runs. $OUT holds at most 8 files:
#   gpu_check.log  summary.json  junit_cuda.xml  junit_triton.xml  ops.json  model.json  artifacts.tar.gz
# summary.json is written on every exit (a trap), with pass/fail counts per backend and the key benchmark
# ratios, which are also the last lines printed. Exit status: 0 when nothing that ran failed (stages that
# cannot run without a GPU are skipped, so a CPU-only run exits 0 with a summary saying so).
# Environment: PYTHON (default python3), OUT, GPU_CHECK_SECONDS, GPU_CHECK_SKIP_BUILD=1 (use the _C you have).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_results}"
BUDGET="${GPU_CHECK_SECONDS:-420}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # everything else, archived into artifacts.tar.gz
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, built in place
export ELIT_TRITON_AUTOTUNE="${ELIT_TRITON_AUTOTUNE:-0}"  # heuristic tiles: autotuning every bucket would not fit
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
: > "$WORK/stages.tsv"

finish() {
  local rc=$?
  echo
  echo "=== summary ($SECONDS s) ==="
  "$PY" tools/gpu_summary.py --out "$OUT" --work "$WORK" --exit-code "$rc" --seconds "$SECONDS" || \
    echo "{\"error\": \"tools/gpu_summary.py failed\", \"exit_code\": $rc}" > "$OUT/summary.json"
  tar -czf "$OUT/artifacts.tar.gz" -C "$WORK" . 2>/dev/null
  rm -rf "$WORK"
}
trap finish EXIT

left() { echo $(( BUDGET - 10 - SECONDS )); }  # 10 s kept for the summary
stage() {  # stage NAME LIMIT CMD...: run under min(LIMIT, time left); record name, rc, seconds
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  local budget; budget=$(left)
  (( budget < limit )) && limit=$budget
  if (( limit < 5 )); then
    echo "=== $name: skipped, the ${BUDGET}s budget is spent ==="
    printf '%s\t%s\t%s\n' "$name" "skipped:budget" 0 >> "$WORK/stages.tsv"
    return 0
  fi
  echo "=== $name (limit ${limit}s, at ${SECONDS}s) ==="
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  echo "=== $name: rc=$rc in $(( SECONDS - t0 ))s ==="
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >> "$WORK/stages.tsv"
  return 0
}
skip() { echo "=== $1: skipped ($2) ==="; printf '%s\t%s\t0\n' "$1" "skipped:$2" >> "$WORK/stages.tsv"; }

echo "=== environment ==="
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
} | tee "$WORK/env.txt"
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

if [ "$GPU" != 1 ]; then
  skip "build" "no CUDA device"
elif [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  skip "build" "GPU_CHECK_SKIP_BUILD=1"
else
  cap=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  stage "build" 150 "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1
  tail -n 3 "$WORK/build.log"
fi
"$PY" -c "import elit_kernels, elit_kernels._cext as c; print('backends', [(r['name'], r['available']) for r in elit_kernels.describe_backends()]); print('_C', c.build_info() if c.available() else c.load_error)" \
  2>&1 | tee -a "$WORK/env.txt"

# The CUDA kernels first: they have never run, and the Triton stage's compiles take longer.
stage "tests: cuda kernels" 75 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cext.py tests/test_dropin.py \
  tests/test_known_answer.py -k "cuda" --junitxml="$OUT/junit_cuda.xml"
stage "tests: triton kernels" 110 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_triton_attention.py \
  tests/test_known_answer.py -k "test_gpu_ and not fp32 or known_answer_on_gpu and triton" \
  --junitxml="$OUT/junit_triton.xml"

if [ "$GPU" != 1 ]; then
  skip "bench: attention ops" "no CUDA device"
  skip "bench: model" "no CUDA device"
else
  stage "bench: attention ops" 80 "$PY" benchmarks/bench_ops.py --device cuda --config XL/2 --resolution 512 \
    --dtype bf16 --batch 8 --budgets 64,ragged --head-dims 64,72,128 --flex core --no-slack --repeats 3 \
    --max-seconds 50 --out "$WORK/ops"
  [ -f "$WORK/ops/ops.json" ] && cp "$WORK/ops/ops.json" "$OUT/ops.json"
  stage "bench: model" 80 "$PY" -m elit_kernels.bench --device cuda --config XL/2 --resolution 512 --dtype bf16 \
    --batch 8 --repeats 3 --max-seconds 55 --no-progress --out "$WORK/model"
  [ -f "$WORK/model/results.json" ] && cp "$WORK/model/results.json" "$OUT/model.json"
fi
