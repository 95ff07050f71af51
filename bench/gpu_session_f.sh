#!/usr/bin/env bash
# fp8's speed and CUDA graphs at the defaults (docs/BENCHMARKS.md, "Faster edits"), one H200:
#   WHEELS=.whl-fast bash bench/gpu_session_f.sh OUT_DIR [SECONDS]
# 1. fp8 eager against fp16 eager (the default and the preset);
# 2. CUDA graphs (torch.compile mode reduce-overhead) at the defaults, whose mask step keeps outputs across calls;
# 3. fp8 compiled, cut off after SECONDS (default 240), printing every thread's stack each minute, since its compile
#    has run past ten minutes before.
set -uo pipefail
out=${1:?output folder}
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"; fi
mkdir -p "$out/eager" "$out/cudagraphs" "$out/compiled"
python3 bench/fast_gpu.py --no-compile --variants "default,preset fast" --engine-variants fp8 --diffusers-n 0 \
  --out "$out/eager" 2>&1 | grep -v "^W1" | cut -c1-400 | tail -7
python3 bench/fast_gpu.py --variants "" --engine-variants cudagraphs --engine-edits default --diffusers-n 0 \
  --out "$out/cudagraphs" 2>&1 | grep -v "^W1" | cut -c1-400 | tail -3
timeout "${2:-240}" python3 bench/fast_gpu.py --variants "" --engine-variants fp8 --engine-edits default \
  --diffusers-n 0 --dump-stacks 60 --out "$out/compiled" > "$out/fp8_compiled.log" 2>&1
echo "fp8 compiled: exit $?"; grep -v "^W1" "$out/fp8_compiled.log" | grep "variant" | cut -c1-400
