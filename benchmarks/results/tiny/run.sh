#!/usr/bin/env bash
# Reproduce benchmarks/results/tiny/ from the repository root:  bash benchmarks/results/tiny/run.sh
# tiny-llava-next has tiny RANDOM weights: these runs check the bench/predict/compare pipeline only.
set -euo pipefail
out=benchmarks/results/tiny
work=build/bench-work          # per-budget bundles are exported here once and reused
vt=${VTPRUNE:-.venv/bin/vtprune}
note="Shared 2-vCPU VM without a GPU: expect run-to-run noise of several percent, more in p90/p99."
common=(--warmup 5 --iters 100 --new-tokens 32 --no-progress --force)

# 1. the measurement: ONNX Runtime CPU, one intra-op thread per session
"$vt" bench --model tiny-llava-next --budgets all,32,16,8 --backend ort --provider cpu --threads 1 \
    --work-dir "$work" --note "$note" "${common[@]}" --out "$out/bench"
# 2. the same with ONNX Runtime's default threads (2 here): three sessions' spinning pools share 2 vCPUs
"$vt" bench --model tiny-llava-next --budgets all,32,16,8 --backend ort --provider cpu \
    --work-dir "$work" --note "$note" "${common[@]}" --out "$out/bench-default-threads"
"$vt" compare "$out/bench" "$out/bench-default-threads" --labels threads-1,threads-default \
    --out "$out/compare-threads" --force

# 3. the predictor on this machine (cpu-host peaks measured with 1 thread), raw and calibrated
bundles=("$work"/tiny-llava-next/{none-all,gprune-k32,gprune-k16,gprune-k8})
"$vt" predict "${bundles[@]}" --device cpu-host --threads 1 --new-tokens 32 \
    --out "$out/predict-cpu-host" --force
"$vt" predict "${bundles[@]}" --device cpu-host --threads 1 --calibrate "$out/bench" \
    --out "$out/predict-cpu-host-calibrated" --force
"$vt" compare "$out/bench" "$out/predict-cpu-host" "$out/predict-cpu-host-calibrated" \
    --labels measured,predicted,calibrated --out "$out/compare-measured-vs-predicted" --force

# 4. the same bundles on a board we do not have (uncalibrated roofline, FP16)
"$vt" predict "${bundles[@]}" --device orin-nano-8gb --precision fp16 --new-tokens 32 \
    --out "$out/predict-orin-nano-8gb-fp16" --force
