#!/usr/bin/env bash
# Where an actor's start-up goes before its first weight is read: Python's imports of torch, diffusers and
# transformers and the model classes a load touches, timed three times in fresh processes (the first may compile
# bytecode), then once more without torchao installed (diffusers imports it when present).
#   WHEELS=.whl-fast bash bench/import_gpu.sh OUT_DIR        (docs/BENCHMARKS.md, "Start-up")
set -uo pipefail
out=${1:?output folder}
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"; fi
mkdir -p "$out"
code='import time; t=time.time()
import torch, diffusers, transformers
from diffusers import UNet2DConditionModel, AutoencoderKL, DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer
import diffedit.stages.model
print(f"imports {time.time() - t:.2f} s")'
for i in 1 2 3; do python3 -X importtime -c "$code" 2> "$out/importtime_$i.txt"; done
python3 - "$out/importtime_3.txt" <<'PY'
import sys  # the 25 largest cumulative import times at any depth (indented as Python nests them), and the total
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1]) if l.startswith("import time:") and "self" not in l]
print(f"{sum(int(a.split(':')[1]) for a, _, _ in rows) / 1e6:7.2f} s in all (self times summed)")
for us, name in sorted(((int(c), n) for _, c, n in rows), reverse=True)[:25]: print(f"{us / 1e6:7.2f} s {name}")
PY
site=$(python3 -c "import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))")
if ls -d "$site"/torchao >/dev/null 2>&1; then
  aside=$(mktemp -d) && mv "$site"/torchao* "$aside"/
  python3 -c "$code"; python3 -c "$code"
  mv "$aside"/* "$site"/ && rmdir "$aside"
fi
