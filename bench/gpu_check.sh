#!/usr/bin/env bash
# One command for a fresh GPU machine whose Python already has torch and triton (the step deadlines add up to under 8 minutes):
# install this working tree, run the Triton equivalence matrix on cuda, the sync-free / CUDA-graph /
# autotune checks, python -m attention.tune for the DeepSeek presets, the benchmarks against dense
# SDPA and the matmul peak, and bench/gpu_selection_check.py when it exists. Everything lands in
# $OUT (default ./out): logs, JSON, tuned store, docs/benchmarks/<gpu>.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# On the lent GPU machine only a handful of files come back from $OUT: work in a scratch folder and
# leave a tarball plus the summary files there at the end. Run by hand, everything lands in ./out.
if [ -n "${OUT:-}" ]; then
  FINAL="$OUT"
  OUT="$ROOT/.gpu_check_out"
  rm -rf "$OUT"
else
  FINAL=""
  OUT="$ROOT/out"
fi
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export ATTENTION_TUNING_DIR="$OUT/tuning"   # the tuned store travels back with the results
export ATTENTION_NAN_FILL=1
unset TRITON_INTERPRET
start=$(date +%s)
status=0
step() {  # step NAME TIMEOUT_S CMD...: run with a deadline, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, t+$(( $(date +%s) - start ))s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc"
  echo "$name $rc" >> "$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
}
: > "$OUT/steps.txt"
{ nvidia-smi || true; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
step install 60 "$PY" -m pip install --no-deps --no-build-isolation -e .
# Matrix: one process per dtype, in parallel: the time is Triton compiles, which are CPU-bound.
echo "== matrix (3 processes)"
for dt in float32 float16 bfloat16; do
  timeout --kill-after=10 150 "$PY" bench/gpu_triton_check.py matrix --dtype $dt --out "$OUT" > "$OUT/matrix_$dt.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || status=1; done
grep -h "FAIL" "$OUT"/matrix_*.log | head -n 40; grep -c "^  ok" "$OUT"/matrix_*.log
step check 60 "$PY" bench/gpu_triton_check.py check --out "$OUT"
step tune 120 "$PY" bench/gpu_triton_check.py tune --out "$OUT"
step bench 90 "$PY" bench/gpu_triton_check.py bench --out "$OUT"
if [ -f bench/gpu_selection_check.py ]; then
  left=$(( 470 - ($(date +%s) - start) ))
  step selection $(( left > 30 ? left : 30 )) "$PY" bench/gpu_selection_check.py
fi
"$PY" bench/gpu_triton_check.py report --out "$OUT" >> "$OUT/bench.log" 2>&1 || status=1
echo "== done in $(( $(date +%s) - start ))s, status=$status; report under $OUT/docs/benchmarks/"
cat "$OUT/steps.txt"
if [ -n "$FINAL" ]; then
  mkdir -p "$FINAL"
  tar czf "$FINAL/gpu_check.tgz" -C "$OUT" .
  cp "$OUT/steps.txt" "$FINAL/" 2>/dev/null
  cp "$OUT"/docs/benchmarks/*.md "$OUT"/docs/benchmarks/*.json "$FINAL/" 2>/dev/null
  echo "== packed into $FINAL: $(ls "$FINAL" | tr '\n' ' ')"
fi
exit $status
