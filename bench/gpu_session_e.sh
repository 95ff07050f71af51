#!/usr/bin/env bash
# The speed rows not yet timed (docs/BENCHMARKS.md, "Faster edits"), compiled, one H200:
#   WHEELS=.whl-fast bash bench/gpu_session_e.sh OUT_DIR
# --steps 25 --cache-interval 2, then CUDA graphs (torch.compile mode reduce-overhead) at the defaults and the preset.
set -uo pipefail
out=${1:?output folder}
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"; fi
python3 bench/fast_gpu.py --variants "default,steps 25 + reuse 2" --engine-variants cudagraphs --diffusers-n 0 \
  --out "$out" 2>&1 | grep -v "^W1" | cut -c1-600 | tail -12
