#!/usr/bin/env bash
# One command for a fresh GPU machine whose Python already has torch and triton: install this working
# tree, build the CUDA top-k, run the Triton equivalence matrix on cuda, the sync-free / CUDA-graph /
# autotune checks, python -m attention.tune for the DeepSeek presets, the benchmarks against dense
# SDPA and the matmul peak, the selection check, and the report (docs/benchmarks/<gpu>.md).
#
# Built for one try of about 8 minutes on a lent machine that may be killed at any moment:
# - every step has a time limit; the limits of the steps run one after another (and their kill
#   grace) add up to under 7 minutes (BUDGET_S), the report step included;
# - after every step the results so far are packed into $OUT (gpu_check.tgz, steps.txt,
#   summary.txt, the report), so a run killed mid-way still returns everything finished before;
# - $OUT holds at most 7 files, none in a subfolder (the device tool returns 8 files of <= 16 MiB);
# - the install leaves the CUDA extension out (ATTENTION_BUILD_CUDA=0) and a separate step builds
#   it, so a failing nvcc build never fails the install; both Python checks import the package from
#   this checkout, so they run even when the install failed.
#
# Environment: OUT (where results land; default ./out, where everything is written directly),
# PYTHON (default python), GPU_CHECK_DEVICE=cpu (the dry run: interpreter, tiny shapes, pip --dry-run;
# tests/test_triton_gpu_check.py), GPU_CHECK_WORK (scratch folder), GPU_CHECK_TIME_SCALE (percent
# applied to every limit; tests shrink them).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SCALE="${GPU_CHECK_TIME_SCALE:-100}"
GRACE=2          # seconds between TERM and KILL when a step overruns
BUDGET_S=420     # what the sequential limits below must stay under (checked by the dry-run test)
if [ -n "${OUT:-}" ]; then
  FINAL="$OUT"
  WORK="${GPU_CHECK_WORK:-$ROOT/.gpu_check_out}"
else
  FINAL=""
  WORK="${GPU_CHECK_WORK:-$ROOT/out}"
fi
rm -rf "$WORK"
mkdir -p "$WORK"
[ -z "$FINAL" ] || mkdir -p "$FINAL"
export OUT="$WORK"                          # the Python steps write here
export ATTENTION_TUNING_DIR="$WORK/tuning"  # the tuned store travels back with the results
export ATTENTION_NAN_FILL=1                 # checks: an unwritten output fails; timings switch it off
if [ "$DEVICE" = cpu ]; then
  export TRITON_INTERPRET=1
  DEV_ARGS=(--device cpu); SEL_ARGS=(--quick --cpu-dry-run); PIP_ARGS=(--dry-run)
else
  unset TRITON_INTERPRET
  DEV_ARGS=(--device cuda); SEL_ARGS=(--quick); PIP_ARGS=()
fi
start_ms=$(date +%s%3N)
: > "$WORK/steps.txt"

secs() {  # secs N: N seconds scaled by GPU_CHECK_TIME_SCALE, as timeout(1) wants them
  local ms=$(( $1 * 10 * SCALE ))
  printf '%d.%03d' $(( ms / 1000 )) $(( ms % 1000 ))
}

publish() {  # copy what exists so far into $OUT; serialised, since background steps publish too
  [ -n "$FINAL" ] || return 0
  (
    if command -v flock > /dev/null; then flock 9; fi  # without flock: unserialised, still better than nothing
    # Files over 4 MiB stay behind (listed), so the tarball stays far below the 16 MiB limit.
    (cd "$WORK" && find . -type f ! -name '.*' -size -4M | sort > .packed \
      && find . -type f ! -name '.*' ! -size -4M | sort > .left_out)
    tar czf "$FINAL/gpu_check.tgz.part" -C "$WORK" -T "$WORK/.packed" .left_out 2>/dev/null \
      && mv -f "$FINAL/gpu_check.tgz.part" "$FINAL/gpu_check.tgz"
    cp "$WORK/steps.txt" "$FINAL/steps.txt"
    [ ! -f "$WORK/summary.txt" ] || cp "$WORK/summary.txt" "$FINAL/summary.txt"
    [ ! -f "$WORK/selection_check.txt" ] || cp "$WORK/selection_check.txt" "$FINAL/selection_check.txt"
    for f in "$WORK"/docs/benchmarks/*.md "$WORK"/docs/benchmarks/*.json; do
      [ ! -f "$f" ] || cp "$f" "$FINAL/report.${f##*.}"
    done
  ) 9> "$WORK/.publish.lock"
}
trap 'echo "== interrupted"; publish; exit 130' INT TERM HUP

step() {  # step NAME LIMIT_S CMD...: run under a time limit, log to NAME.log, record, publish
  local name=$1 limit=$2; shift 2
  local t0 rc
  t0=$(date +%s%3N)
  echo "== $name (limit ${limit}s, t+$(( (t0 - start_ms) / 1000 ))s)"
  timeout --kill-after="$(secs $GRACE)" "$(secs "$limit")" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  tail -n 15 "$WORK/$name.log"
  # steps.txt: name, exit status (124/137: over its limit), ms taken, limit in s, ms from the start
  echo "$name $rc $(( $(date +%s%3N) - t0 )) $limit $(( t0 - start_ms ))" >> "$WORK/steps.txt"
  echo "== $name: rc=$rc"
  publish
  return $rc
}

status=0
{ nvidia-smi || true; } > "$WORK/nvidia-smi.txt" 2>&1
# Versions are printed after the imports: triton's is the one that loaded, not a guess.
step env 15 "$PY" -c "import sys, platform, torch, triton; print('python', platform.python_version()); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'); print('executable', sys.executable)" \
  || status=1
step install 45 env ATTENTION_BUILD_CUDA=0 "$PY" -m pip install --no-deps --no-build-isolation "${PIP_ARGS[@]}" -e . \
  || status=1
# Background: the CUDA top-k build (nvcc + torch headers), needed only by the selection step.
step cuda_ext 150 "$PY" csrc/cuda/build_ext.py & cuda_ext_pid=$!
# Matrix: one process per dtype, in parallel (the time is Triton compiles, which are CPU-bound).
pids=()
for dt in float32 float16 bfloat16; do
  step "matrix_$dt" 110 "$PY" bench/gpu_triton_check.py matrix "${DEV_ARGS[@]}" --dtype "$dt" --out "$WORK" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
step check 40 "$PY" bench/gpu_triton_check.py check "${DEV_ARGS[@]}" --out "$WORK" || status=1
# Timing steps: bench/gpu_triton_check.py switches the NaN fill off around every timed call.
step tune 55 "$PY" bench/gpu_triton_check.py tune "${DEV_ARGS[@]}" --out "$WORK" || status=1
step bench 70 "$PY" bench/gpu_triton_check.py bench "${DEV_ARGS[@]}" --out "$WORK" || status=1
wait "$cuda_ext_pid" || status=1
step selection 45 "$PY" bench/gpu_selection_check.py "${SEL_ARGS[@]}" || status=1
step report 15 "$PY" bench/gpu_triton_check.py report "${DEV_ARGS[@]}" --out "$WORK" || status=1
{
  echo "gpu_check on $DEVICE: status=$status after $(( ($(date +%s%3N) - start_ms) / 1000 ))s"
  echo "steps (name rc ms limit_s start_ms):"; cat "$WORK/steps.txt"
  echo; cat "$WORK/env.log" 2>/dev/null
  echo; grep -h "FAIL" "$WORK"/matrix_*.log 2>/dev/null | head -n 40
  [ ! -f "$WORK/selection_check.txt" ] || { echo; cat "$WORK/selection_check.txt"; }
} > "$WORK/summary.txt"
publish
cat "$WORK/summary.txt"
[ -z "$FINAL" ] || echo "== results in $FINAL: $(ls "$FINAL" | tr '\n' ' ')"
exit $status
