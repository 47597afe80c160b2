#!/usr/bin/env bash
# On-device job: build TensorRT engines for a bundle, then benchmark it, writing everything to OUT.
# Usage: vtprune-jetson BUNDLE_DIR OUT_DIR
# Environment: VTPRUNE_BUILD_ARGS (extra 'vtprune build' flags), VTPRUNE_BENCH_ARGS (extra 'vtprune bench'
# flags; default: the engines just built, "--backend trt", when torch sees the GPU, else ONNX Runtime on
# the CPU, "--backend ort --provider cpu"), VTPRUNE_SKIP_BUILD=1.
set -euo pipefail

bundle="${1:?usage: vtprune-jetson BUNDLE_DIR OUT_DIR}"
out="${2:?usage: vtprune-jetson BUNDLE_DIR OUT_DIR}"
if [ ! -f "${bundle}/manifest.json" ]; then
    echo "vtprune-jetson: error: ${bundle} is not a vtprune bundle (no manifest.json); mount one at ${bundle}" >&2
    exit 2
fi
mkdir -p "${out}"

# Record how the board was set up: latency without the power mode is not reproducible.
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [ -r /etc/nv_tegra_release ]; then echo "l4t: $(head -n 1 /etc/nv_tegra_release)"; fi
    if command -v nvpmodel >/dev/null 2>&1; then echo "nvpmodel: $(nvpmodel -q 2>/dev/null | tr '\n' ' ')"; fi
    if command -v jetson_clocks >/dev/null 2>&1; then echo "jetson_clocks: $(jetson_clocks --show 2>/dev/null | head -n 3 | tr '\n' ' ')"; fi
} > "${out}/board.txt"

if [ "${VTPRUNE_SKIP_BUILD:-0}" != "1" ]; then
    # shellcheck disable=SC2086  # word splitting of the extra flags is intended
    vtprune build "${bundle}" --force ${VTPRUNE_BUILD_ARGS:-} 2>&1 | tee "${out}/build.log"
fi
# The TensorRT runner needs torch with CUDA (the image's Jetson wheel); without it, ONNX Runtime on the CPU.
if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    default_bench="--backend trt"
else
    default_bench="--backend ort --provider cpu"
    echo "vtprune-jetson: torch sees no CUDA device; benchmarking with ONNX Runtime on the CPU" >&2
fi
echo "bench defaults: ${default_bench}" >> "${out}/board.txt"
# shellcheck disable=SC2086
vtprune bench "${bundle}" --out "${out}/report" --force ${VTPRUNE_BENCH_ARGS:-${default_bench}}
echo "vtprune-jetson: report written to ${out}/report (copy it back and run 'vtprune compare')"
