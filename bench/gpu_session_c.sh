#!/usr/bin/env bash
# fp8's quality and speed in one GPU command (docs/BENCHMARKS.md, "Faster edits"):
#   WHEELS=.whl-fast bash bench/gpu_session_c.sh OUT_DIR
# 1. bench/fast_gate.py --in-process: fp8 against the default on the shipped shapes model, on the GPU;
# 2. bench/fast_gpu.py: fp8 at SD 1.5 scale, compiled, at the defaults and at --preset fast.
set -uo pipefail
out=${1:?output folder}
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"; fi
python3 bench/fast_gate.py --n 64 --device cuda --in-process --variants fp8 --out "$out" 2>&1 | grep -v "^W1" | tail -5
python3 bench/fast_gpu.py --variants "" --engine-variants fp8 --diffusers-n 0 --out "$out" 2>&1 | grep -v "^W1" | tail -6
