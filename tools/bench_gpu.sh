#!/usr/bin/env bash
# GPU benchmarks in one go (about 4 minutes on an H100): the ELIT model latency-vs-budget study
# (elit-bench, XL/2 512px bf16) and the varlen attention op benchmark (Read/Write/core shapes, every
# backend and comparator). Results land in "$OUT" (or ./gpu_results):
#   $DEST/model/{results.json,results.csv,latency_vs_latents.png,log.txt}
#   $DEST/ops/{ops.json,ops.csv,log.txt}   $DEST/env.txt
# Each step has its own time budget (--max-seconds stops repeating, results are still written) and a
# hard timeout, so one slow step cannot eat the next one's time: 10 s env + 140 s model + 85 s ops fits
# the 240 s that tools/gpu_check.sh gives this script. Exit status: non-zero if a step failed.
# Triton autotuning (one search per new length bucket: dozens of buckets here) would not fit, so this
# script runs the Triton kernels on their heuristic tiles unless ELIT_TRITON_AUTOTUNE is already set;
# the value used is recorded in each results file's metadata ("env").
# Called from tools/gpu_check.sh; runnable alone:  OUT=/tmp/g bash tools/bench_gpu.sh
set -u
cd "$(dirname "$0")/.."
DEST="${OUT:-./gpu_results}"
PY="${PYTHON:-python}"
export ELIT_TRITON_AUTOTUNE="${ELIT_TRITON_AUTOTUNE:-0}"
mkdir -p "$DEST/model" "$DEST/ops"

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
  "$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not importable")
import elit_kernels
print("backends", [(r["name"], r["available"]) for r in elit_kernels.describe_backends()])
PYEOF
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"

status=0
step() {  # step NAME LOG HARD_TIMEOUT CMD...
  local name=$1 log=$2 limit=$3; shift 3
  echo "=== $name (hard limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 80 "$log"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  [ "$rc" -ne 0 ] && status=1
  return 0
}

# Model: every scenario, every available backend (triton, cuda, torch, torch_varlen…), the
# official-style dense baseline and the plain DiT (~57 cases). Warm-up/compile + FLOP counting come
# first; the interleaved repeats stop at the first full repeat that ends past 75 s from the start.
step "model latency vs budget" "$DEST/model/log.txt" 140 \
  "$PY" -m elit_kernels.bench --device cuda --config XL/2 --resolution 512 --dtype bf16 --batch 8 \
    --repeats 5 --max-seconds 75 --no-progress --out "$DEST/model"

# Ops: Read/Write/core at J_max/16, J_max and a ragged batch, fwd and fwd+bwd. FlexAttention recompiles
# per shape, so it runs on the core shapes only here.
step "varlen attention ops" "$DEST/ops/log.txt" 85 \
  "$PY" benchmarks/bench_ops.py --device cuda --config XL/2 --resolution 512 --dtype bf16 --batch 8 \
    --budgets 4,64,ragged --flex core --repeats 3 --max-seconds 45 --out "$DEST/ops"

echo "bench_gpu.sh: results in $DEST (status $status)"
exit $status
