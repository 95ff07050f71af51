#!/usr/bin/env bash
# Start-up, fp8 quality and fp8 speed in one GPU command (docs/BENCHMARKS.md, "Faster edits"):
#   WHEELS=.whl-fast bash bench/gpu_session_b.sh OUT_DIR
# 1. bench/startup_gpu.py: cold, cached on another node, restarted on the same node, eager;
# 2. bench/fast_gate.py --in-process: fp8 against the default on the shipped shapes model, on the GPU;
# 3. bench/fast_gpu.py: fp8 speed at SD 1.5 scale, the default's graphs from step 1's Inductor cache.
set -uo pipefail
out=${1:?output folder}
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"; fi
work=$(mktemp -d -t startup-XXXX)
python3 bench/startup_gpu.py --work $work --scenarios cold,"another node",restarted,eager --out "$out" 2>&1 | grep -v "^W1" | tail -8
python3 bench/fast_gate.py --n 64 --device cuda --in-process --variants fp8 --out "$out" 2>&1 | grep -v "^W1" | tail -5
TORCHINDUCTOR_CACHE_DIR=$work/inductor-1 TRITON_CACHE_DIR=$work/inductor-1/triton \
  python3 bench/fast_gpu.py --variants default --engine-variants fp8 --diffusers-n 0 --out "$out" 2>&1 | grep -v "^W1" | tail -6
