#!/usr/bin/env bash
# The benchmarks on one GPU (written for an H200, CUDA torch 2.11, Python 3.12), in about 200 s.
# Run from the repository root with OUT set to an empty folder:
#   OUT=/some/empty/dir bash scripts/gpu-check-bench.sh
# Writes (flat, 7 files): step_cost.json, overhead.json, quality.json, quality-samples.npz, quality-verify.json,
# sampling.json, log.txt. Copy the JSON (and the npz) into benchmarks/results/gpu/ and run
#   python -m benchmarks.report
# to put the GPU figures into docs/results.md beside (not mixed with) the CPU ones.
set -euo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
RUNS=$(mktemp -d)  # run folders (checkpoints) stay out of $OUT
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SMOKE=1: a seconds-long dry run of this script without a GPU
if [[ "${SMOKE:-0}" == 1 ]]; then
  SC="--batch 256 --width 64 --reps 2 --inner 1 --warmup 1"; OH="$SC"
  QU="--seeds 1 --steps 5 --batch 64 --num-samples 2000 --methods lsd,fm"; SA="--num-samples 2000 --reps 1"
else
  SC="--batch 4096 --reps 15 --inner 10 --warmup 5"; OH="--batch 4096 --reps 30 --inner 10 --warmup 10"
  QU="--seeds 2 --steps 400 --batch 4096 --num-samples 64000"; SA="--num-samples 64000"
fi

step() {  # step NAME SECONDS CMD...: run with a time limit; a failure is logged and the next step runs
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  if timeout "$limit" "$@" >>"$LOG" 2>&1; then
    echo "== $name done in $((SECONDS - t0)) s" | tee -a "$LOG"
  else
    echo "== $name FAILED (exit $?) after $((SECONDS - t0)) s; see log.txt" | tee -a "$LOG"
  fi
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} >>"$LOG" 2>&1

# 1. step cost at the paper's target: 4 x 512 MLP, batch 4096, eta = 0.75; CUDA events, warm-up, interleaved
step step_cost 45 $PY -m benchmarks.step_cost --device "$DEVICE" $SC --out "$OUT/step_cost.json"
# 2. overhead: compiled LSD step against the hand-written one, same setting
step overhead 20 $PY -m benchmarks.overhead --device "$DEVICE" $OH --out "$OUT/overhead.json"
# 3. quality at a reduced budget (the paper's: --full, 150k steps at batch 100k)
step quality 110 $PY -m benchmarks.quality --device "$DEVICE" $QU --out "$OUT/quality.json" --runs-dir "$RUNS/quality"
step verify 10 $PY -m benchmarks.verify "$OUT/quality.json" --out "$OUT/quality-verify.json"
# 4. sampling throughput from the quality runs
step sampling 30 $PY -m benchmarks.sampling --device "$DEVICE" $SA --runs "$RUNS/quality" --out "$OUT/sampling.json"
rm -rf "$RUNS"
ls -la "$OUT" | tee -a "$LOG"
