#!/usr/bin/env bash
# Train the shapes world's models on a one-GPU machine with no internet, in one command (~9.5 minutes):
# the LDM (VAE, then UNet + text encoder) and, in parallel on the same GPU, the CLIP.
#   bash shapes/gpu_run.sh RUN_DIR [VAE_MIN UNET_MIN CLIP_MIN]
# Wheels for what the machine lacks (diffusers, open_clip_torch, ftfy, wcwidth) are read from .whl/
# (bash ../shared/gpu/make-wheels.sh); a machine with them installed skips that step.
# Rerun with the same RUN_DIR (and RESUME=1) to continue from RUN_DIR/ckpt.
set -euo pipefail
run=${1:?run dir}; vae=${2:-2.5}; unet=${3:-5.5}; clip=${4:-4}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/diffusers-*.whl .whl/open_clip_torch-*.whl .whl/ftfy-*.whl .whl/wcwidth-*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! python3 -c "import diffedit" 2>/dev/null; then  # the repository root is the package
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/diffedit && export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
resume=${RESUME:+--resume}
mkdir -p "$run"
python3 -m diffedit.shapes.train_clip --out "$run/clip" --minutes "$clip" --pool 100000 $resume > "$run/clip.log" 2>&1 &
clip_pid=$!
python3 -m diffedit.shapes.train --out "$run/ldm" --vae-minutes "$vae" --unet-minutes "$unet" --pool 150000 --vae-batch 256 \
  --minutes "$(python3 -c "print($vae + $unet + 1.0)")" $resume 2>&1 | grep -v "should be kept in float32" | tee "$run/ldm.log"
wait $clip_pid || { cat "$run/clip.log"; exit 1; }
grep -v Warning "$run/clip.log" | tail -3
