#!/usr/bin/env bash
# One call on a GPU machine (torch + triton + pytest-xdist preinstalled, no network): build the CUDA extension for
# this card, run every GPU test (crash-isolated), measure the dispatch table, time the attention ops, the
# elementwise ops (fused vs native vs compiled) and the XL/2 512px model (default dispatch against the dense "official way", bf16 with a per-stage breakdown, fp32, and a
# whole CCFG sampling run against the official sampler).
#
#   bash tools/gpu_check.sh                # results in $OUT (default ./gpu_results)
#
# Budget: GPU_CHECK_SECONDS (default 480 s) for the whole script; each stage has its own limit, planned so the
# limits add up to the budget less 40 s (start-up probes and test collection, ~27 s on the 12-04 H200 run, and 10 s
# kept for the summary; the table is printed first), and a stage gets at most what is left, its benchmark's own
# --max-seconds taken from what it gets. Sized from the 12-04 H200 run: 208 tests in 51 s (the selection is 418
# now), model 55 s, and the op bench and the sampling bench lost most of their cases to a deadline 18 s / 13 s away. A stage past
# its limit gets SIGINT (pytest still writes its junit XML) and the next stage runs. GPU tests run under
# pytest-xdist workers (-n), so a test that crashes its process (SIGSEGV, illegal access) is reported as failed
# and the others still run; the summary lists every collected test that did not run and why.
# $OUT holds at most 8 files:
#   gpu_check.log  summary.json  junit_gpu.xml  dispatch_table.json  dispatch_report.md  ops.json  model.json
#   artifacts.tar.gz (logs, the elementwise bench, the fp32 model run, the sampling run, the collected test list)
# summary.json is written on every exit (a trap), with pass/fail counts per backend and the key benchmark
# ratios, which are also the last lines printed; each input is read on its own (one it cannot read is listed in
# "problems"), and "ok" is false, with the reasons in "why_not_ok", when the test results are missing or
# unreadable, an input cannot be read, a test or stage failed, or the script's exit status was not 0. Exit status: 0 when nothing that ran failed (stages that
# cannot run without a GPU are skipped, so a CPU-only run exits 0 with a summary saying so).
# Environment: PYTHON (default python3), OUT, GPU_CHECK_SECONDS, GPU_CHECK_SKIP_BUILD=1 (use the _C you have),
# GPU_CHECK_WORKERS (pytest-xdist workers, default 8).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_results}"
BUDGET="${GPU_CHECK_SECONDS:-480}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # everything else, archived into artifacts.tar.gz
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, built in place
export ELIT_TRITON_AUTOTUNE="${ELIT_TRITON_AUTOTUNE:-0}"  # heuristic tiles: autotuning every bucket would not fit
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
: > "$WORK/stages.tsv"

finish() {
  local rc=$?
  echo
  echo "=== summary ($SECONDS s) ==="
  "$PY" tools/gpu_summary.py --out "$OUT" --work "$WORK" --exit-code "$rc" --seconds "$SECONDS" || \
    echo "{\"error\": \"tools/gpu_summary.py failed\", \"exit_code\": $rc}" > "$OUT/summary.json"
  tar -czf "$OUT/artifacts.tar.gz" -C "$WORK" . 2>/dev/null
  rm -rf "$WORK"
  exec 1>&- 2>&-  # let tee see the end of its input and write the log's last lines before the script exits
  wait "$TEE_PID" 2>/dev/null
}
trap finish EXIT

left() { echo $(( BUDGET - 10 - SECONDS )); }  # 10 s kept for the summary
cap() { local l=${LIMIT[$1]} b; b=$(left); (( b < l )) && l=$b; echo "$l"; }  # what stage $1 will get
secs() { local s=$(( $1 - $2 )); (( s < 5 )) && s=5; echo "$s"; }  # a bench's --max-seconds: its limit less $2
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

# The plan: stage limits (seconds) that add up to the budget; printed so a reader sees it before anything runs.
declare -A LIMIT=([build]=25 [tests]=110 [dispatch]=40 [ops]=60 [elementwise]=30 [model]=80 [fp32]=30 [sampling]=65)
echo "=== plan (budget ${BUDGET}s) ==="
printf '%-28s %5s\n' "build" "${LIMIT[build]}" "tests: gpu" "${LIMIT[tests]}" "dispatch: measure" "${LIMIT[dispatch]}" \
  "bench: attention ops" "${LIMIT[ops]}" "bench: elementwise" "${LIMIT[elementwise]}" \
  "bench: model bf16" "${LIMIT[model]}" "bench: model fp32" "${LIMIT[fp32]}" \
  "bench: sampling" "${LIMIT[sampling]}" | tee "$WORK/plan.txt"

if [ "$GPU" != 1 ]; then
  skip "build" "no CUDA device"
elif [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  skip "build" "GPU_CHECK_SKIP_BUILD=1"
else
  cap=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  stage "build" "${LIMIT[build]}" "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1
  tail -n 3 "$WORK/build.log"
fi
"$PY" -c "import elit_kernels, elit_kernels._cext as c; print('backends', [(r['name'], r['available']) for r in elit_kernels.describe_backends()]); print('_C', c.build_info() if c.available() else c.load_error)" \
  2>&1 | tee -a "$WORK/env.txt"

# Every GPU test in one crash-isolated run. The selection: the compiled ops (CUDA kernels and their argument
# checks), the Triton kernels at real sizes in bf16/fp16 (fp32 and tiny shapes are CI's job on the
# interpreter), the known-answer checks on the GPU, the model path (no host sync, capture, dispatch), and the
# contract's case table on every backend but cpp (CPU-only: CI runs it; 33 of the 595 tests this selected).
GPU_FILES="tests/test_cext.py tests/test_dropin.py tests/test_known_answer.py tests/test_triton_attention.py tests/test_triton_window.py tests/test_gpu_model.py tests/test_contract.py tests/test_deterministic.py tests/test_checkpoint_mutants.py"
for f in tests/test_compiled_checks.py tests/test_bounds.py; do [ -f "$f" ] && GPU_FILES="$GPU_FILES $f"; done
GPU_K="(cuda and not triton) or (test_gpu_ and not fp32) or (known_answer_on_gpu and triton) or (every_backend and not cpp)"
XDIST=""
if [ "$GPU" = 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST="-n ${GPU_CHECK_WORKERS:-8} --max-worker-restart=50"
fi
# shellcheck disable=SC2086
"$PY" -m pytest -q --collect-only -p no:cacheprovider $GPU_FILES -k "$GPU_K" 2>/dev/null | grep '::' > "$WORK/collected.txt"
echo "collected $(wc -l < "$WORK/collected.txt") GPU tests${XDIST:+ (pytest-xdist: $XDIST)}"
# shellcheck disable=SC2086
stage "tests: gpu" "${LIMIT[tests]}" "$PY" -m pytest -q -rs -p no:cacheprovider $XDIST $GPU_FILES -k "$GPU_K" \
  --junitxml="$OUT/junit_gpu.xml"

if [ "$GPU" != 1 ]; then
  skip "dispatch: measure" "no CUDA device"
  skip "bench: attention ops" "no CUDA device"
  skip "bench: elementwise" "no CUDA device"
  skip "bench: model bf16" "no CUDA device"
  skip "bench: model fp32" "no CUDA device"
  skip "bench: sampling" "no CUDA device"
else
  L=$(cap dispatch)
  stage "dispatch: measure" "$L" "$PY" tools/measure_dispatch.py --out "$WORK/dispatch" --max-seconds "$(secs "$L" 15)"
  for f in dispatch_table.json dispatch_report.md; do [ -f "$WORK/dispatch/$f" ] && cp "$WORK/dispatch/$f" "$OUT/$f"; done
  L=$(cap ops)
  stage "bench: attention ops" "$L" "$PY" benchmarks/bench_ops.py --device cuda --config XL/2 --resolution 512 \
    --dtype bf16 --batch 16 --budgets 64,4,ragged --head-dims 72 --flex core --no-slack --repeats 3 \
    --max-seconds "$(secs "$L" 12)" --out "$WORK/ops"
  [ -f "$WORK/ops/ops.json" ] && cp "$WORK/ops/ops.json" "$OUT/ops.json"
  # adaLN LayerNorm + modulate and the gated residual at [16384, 1152] bf16: fused (_C) vs native eager vs
  # native compiled (inductor), GB/s; in summary.json and the tarball (the output keeps to 8 files)
  stage "bench: elementwise" "$(cap elementwise)" "$PY" benchmarks/bench_elementwise.py --device cuda \
    --repeats 3 --out "$WORK/elementwise"
  # Past the bench's deadline come the imports before it, the repeat in flight and the writing (12-04: a 35 s
  # deadline ran 55 s in all), and --breakdown's two profiled forwards: 35 s of the limit kept for those
  L=$(cap model)
  stage "bench: model bf16" "$L" "$PY" -m elit_kernels.bench --device cuda --config XL/2 --resolution 512 \
    --dtype bf16 --batch 16 --presets released --backends default,default+graph --budgets 64,16,4,1 --repeats 3 \
    --max-seconds "$(secs "$L" 35)" --breakdown --no-progress --out "$WORK/model"
  [ -f "$WORK/model/results.json" ] && cp "$WORK/model/results.json" "$OUT/model.json"
  L=$(cap fp32)
  stage "bench: model fp32" "$L" "$PY" -m elit_kernels.bench --device cuda --config XL/2 --resolution 512 \
    --dtype fp32 --batch 16 --presets released --backends default --budgets 64,4 --scenarios uniform --repeats 2 \
    --max-seconds "$(secs "$L" 12)" --no-progress --out "$WORK/model_fp32"
  # A whole CCFG sampling run (10 Euler steps; the ratio per step is what a 50-step run gets) against the official
  # sampler's two dense passes per step, eager and graph-replayed.
  # the full-budget forwards every ratio is taken against warm up first (~5 s each); 22 s kept for start-up
  L=$(cap sampling)
  stage "bench: sampling" "$L" "$PY" -m elit_kernels.bench --device cuda --config XL/2 --resolution 512 \
    --dtype bf16 --batch 16 --presets released --backends default,default+graph --budgets 64 --scenarios sampling \
    --sampling-steps 10 --repeats 2 --max-seconds "$(secs "$L" 22)" --no-progress --out "$WORK/sampling"
fi
