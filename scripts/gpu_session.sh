#!/usr/bin/env bash
# One GPU lease on the workplace's offline GPU machine (scripts/README.md), in phases that run as
# consecutive device calls while the machine stays warm; each phase resumes what an earlier call of it
# left (wheels installed, training checkpoint, finished result files).
#
#   bash scripts/gpu_session.sh stage      # calls carrying .stage/part-aa ... : keep the parts on the machine
#   bash scripts/gpu_session.sh train      # call carrying the last part: install, CUDA smoke check, train the
#                                          # projector (-> /root/proj and $OUT)
#   bash scripts/gpu_session.sh measure    # with /root/proj: accuracy curve on the whole test split, the
#                                          # method sweep, the ALVTS target and a torch-cuda latency bench
#                                          # (-> $OUT/results.tgz)
#   bash scripts/gpu_session.sh scale      # LLaVA-1.5-7B at its published config (random fp16 weights) in
#                                          # PyTorch CUDA: prefill and TTFT by method at 576/192/128/64 tokens
#
# Needs: this repo, python3 with CUDA torch, and the wheels of scripts/stage_wheels.sh. Everything else is
# on the machine. Writes only under $GPU_SESSION_ROOT (default /root) and $OUT; PY picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${GPU_SESSION_ROOT:-/root} PY=${PY:-python3}
STAGE=$ROOT/stage SITE=$ROOT/site CACHE=$ROOT/vtcache PROJ=$ROOT/proj RES=$ROOT/results CKPT=$ROOT/ckpt
OUT=${OUT:-$ROOT/out} DEVICE=${DEVICE:-cuda}
LIMIT=(${LIMIT:+--limit $LIMIT})  # LIMIT=N: every measurement on N questions (a dry run on the CPU)
log() { echo "[gpu_session $(date +%H:%M:%S)] $*" >&2; }

stage() {
  cp .stage/part-* "$STAGE/" 2>/dev/null
  ls -l "$STAGE" >&2
}

setup() {
  stage
  if [ ! -f "$SITE/.done" ]; then
    (cd "$STAGE" && cat part-* | tar -x) || return 1
    (cd "$STAGE/wheels" && sha256sum -c --quiet SHA256SUMS) || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STAGE"/wheels/*.whl || return 1
    touch "$SITE/.done"
  fi
  export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" >&2
}

train() {
  setup || { log "setup failed"; return 1; }
  if [ ! -f "$RES/smoke.txt" ]; then
    timeout 240 "$PY" scripts/gpu_smoke.py --device cuda > "$RES/smoke.txt" 2>&1
    log "smoke exit $?: $(tail -1 "$RES/smoke.txt")"
  fi
  cp "$RES/smoke.txt" "$OUT/" 2>/dev/null
  if [ ! -f "$PROJ/pocket_projector.json" ]; then
    "$PY" scripts/train_projector.py --cache-dir "$CACHE" --ckpt-dir "$CKPT" --out-dir "$PROJ" --quiet "$@" \
      2>&1 | tee -a "$PROJ/train.log"
  fi
  cp "$PROJ"/pocket_projector.* "$PROJ/train.log" "$OUT/" 2>/dev/null
  ls -l "$OUT" >&2
}

measure() {
  setup || { log "setup failed"; return 1; }
  [ -f "$PROJ/pocket_projector.json" ] || { log "no trained projector in $PROJ: run the train phase"; return 1; }
  cp "$PROJ"/pocket_projector.safetensors "$PROJ"/pocket_projector.json src/vtprune/models/data/
  local py="$PY" started=$SECONDS
  (while sleep 20; do pack; done) &
  local packer=$!
  if [ ! -f "$RES/accuracy/.done" ]; then
    $py benchmarks/accuracy_curve.py "${LIMIT[@]}" --device "$DEVICE" --workers "${WORKERS:-6}" --cache-dir "$CACHE" --out "$RES/accuracy" \
      && touch "$RES/accuracy/.done"
  fi
  pack
  if [ ! -f "$RES/sweep/.done" ]; then
    $py benchmarks/sweep.py "${LIMIT[@]}" --device "$DEVICE" --cache-dir "$CACHE" --out "$RES/sweep" && touch "$RES/sweep/.done"
  fi
  pack
  if [ ! -f "$RES/alvts-target/.done" ]; then
    $py benchmarks/alvts_target.py "${LIMIT[@]}" --device "$DEVICE" --cache-dir "$CACHE" --layers 8,10,12,16 \
      --unpruned-from "$RES/sweep/sweep.json" --out "$RES/alvts-target" && touch "$RES/alvts-target/.done"
  fi
  pack
  if [ ! -f "$RES/torch-cuda/report.json" ]; then
    $py -m vtprune.cli bench --backend torch --device "$DEVICE" --model pocket --cache-dir "$CACHE" \
      --budgets all,128,64,32,16 --dataset easy-vqa --num-images 8 --iters "${ITERS:-20}" --warmup 3 --no-progress \
      --out "$RES/torch-cuda" --note "PyTorch eager fp32 on the lent GPU; CUDA-synchronised stage timings"
  fi
  kill "$packer" 2>/dev/null
  pack
  log "measure done in $((SECONDS - started)) s"
}

scale() {  # real-size LLaVA-1.5-7B (random fp16 weights at the published config) in PyTorch on the GPU
  setup || { log "setup failed"; return 1; }
  local ck=${SCALE_MODEL:-$ROOT/llava-1.5-7b} budgets=${SCALE_BUDGETS:-all,192,128,64} started=$SECONDS
  if [ -z "${SCALE_MODEL:-}" ] && [ ! -f "$ck/config.json" ]; then
    "$PY" -m vtprune.cli make-checkpoint --config llava-1.5-7b --dtype fp16 --out "$ck" --force || return 1
  fi
  (while sleep 20; do pack; done) &
  local packer=$!
  for method in ${SCALE_METHODS:-gprune alvts fastv random}; do
    [ -f "$RES/scale-$method/report.json" ] && continue
    "$PY" -m vtprune.cli bench --backend torch --device "$DEVICE" --dtype fp16 --model "$ck" --method "$method" \
      --budgets "$budgets" --num-images 4 --iters "${ITERS:-10}" --warmup 2 --new-tokens 16 --no-progress \
      --out "$RES/scale-$method" --note "LLaVA-1.5-7B architecture, random fp16 weights (vtprune make-checkpoint)"
  done
  kill "$packer" 2>/dev/null
  pack
  log "scale done in $((SECONDS - started)) s"
}

pack() {  # atomically, so a call stopped at its time limit still brings back the last complete archive
  tar -C "$RES" -czf "$OUT/.results.tgz" . && mv "$OUT/.results.tgz" "$OUT/results.tgz"
}

phase="${1:-}"
shift || true
case "$phase" in
  stage | train | measure | scale) mkdir -p "$STAGE" "$PROJ" "$RES" "$OUT" && "$phase" "$@" ;;
  *) echo "usage: bash scripts/gpu_session.sh stage|train|measure|scale [train_projector args]" >&2; exit 2 ;;
esac
