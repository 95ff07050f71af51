#!/usr/bin/env bash
# What issue 20 still has to time, in one GPU command (docs/BENCHMARKS.md, "Faster edits"):
#   WHEELS=.whl-fast bash bench/gpu_session_g.sh OUT_DIR
# 1. fp8 compiled (Inductor's settings left alone since 4d24d69) against fp16 compiled, at the defaults and the preset;
# 2. bench/load_gpu.py: where an actor's model load goes, to the CPU then moved against device_map.
# Its first run also passed --dump-stacks 120 to the fp8 run, which crashed in Python's faulthandler while it printed
# the stacks of a compile still tracing (docs/BENCHMARKS.md); without it, the fp8 compile finished (215 s).
set -uo pipefail
out=${1:?output folder}
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"; fi
mkdir -p "$out/fp8" "$out/load"
timeout 420 python3 bench/fast_gpu.py --variants "default,preset fast" --engine-variants fp8 --diffusers-n 0 \
  --out "$out/fp8" > "$out/fp8.log" 2>&1
echo "fp8 compiled: exit $?"; grep "variant" "$out/fp8.log" | cut -c1-400
python3 bench/load_gpu.py --out "$out/load" 2>&1 | cut -c1-600 | tail -3
