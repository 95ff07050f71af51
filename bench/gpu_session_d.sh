#!/usr/bin/env bash
# The one-GPU job on 384 images, cold and then at a warm start from the first run's compile cache, each in a new Ray
# cluster with empty Inductor and Triton caches (as a second run on another node), then the engine in-process
# (docs/BENCHMARKS.md, "Faster edits"):
#   WHEELS=.whl-job bash bench/gpu_session_d.sh OUT_DIR
set -uo pipefail
out=${1:?output folder}
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"; fi
work=$(mktemp -d)
python3 bench/bench_job_gpu.py --images 384 --batch-size 32 --engine-batches 2 --variants c,c --compile \
  --compile-cache "$work/compile-cache" --fresh-caches --engine-last --work "$work" --out "$out" 2>&1 \
  | grep -v "^W1" | cut -c1-600 | tail -8
