#!/usr/bin/env bash
# Train the shapes world's models on a one-GPU machine with no internet, over one or more commands of
# about MINUTES each (for a machine lent for short sessions, or a scheduler's time limit per job): the LDM
# (VAE, then UNet + text encoder) and, in parallel on the same GPU, the CLIP.
#
#   bash shapes/gpu_run.sh RUN_DIR VAE_MIN UNET_MIN CLIP_MIN MINUTES [BACKUP_DIR]
#
# VAE_MIN, UNET_MIN, CLIP_MIN are the total training budgets (minutes, over all commands); run the same
# command again until the LDM log says "unet_done". Each command resumes from RUN_DIR (optimizer included)
# when it is still there; on a fresh machine it restores the EMA-only checkpoint from $RESTORE/resume.tar.part-*
# (default BACKUP_DIR; fresh optimizer, new warm-up). With BACKUP_DIR set, it leaves there, in parts of 15 MB:
#   resume.tar.part-*   what the next command needs (VAE, EMA weights, progress; the CLIP's state until it is done)
#   result.tar.part-*   the exported models (RUN_DIR/ldm/model, RUN_DIR/clip/shapes-clip), logs, curves, metrics
# Wheels for what the machine lacks (diffusers, open_clip_torch, ftfy, wcwidth) are read from $WHEELS
# (default .whl), downloaded beforehand on a machine with internet:
#   pip download --no-deps -d .whl diffusers==0.42.1 open-clip-torch==3.3.0 ftfy wcwidth
# A machine without that folder (the packages installed) skips that step.
set -euo pipefail
run=${1:?run dir}; vae=${2:?vae minutes}; unet=${3:?unet minutes}; clip=${4:?clip minutes}; minutes=${5:?minutes}
backup=${6:-}
restore=${RESTORE:-$backup}  # where an earlier command's resume.tar.part-* are (carried back to the machine)
wheels=${WHEELS:-.whl}
if [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/diffusers-*.whl "$wheels"/open_clip_torch-*.whl "$wheels"/ftfy-*.whl "$wheels"/wcwidth-*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! python3 -c "import diffedit" 2>/dev/null; then  # the repository root is the package
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/diffedit && export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
mkdir -p "$run"
if [ ! -f "$run/ldm/ckpt/progress.json" ] && [ -n "$restore" ] && ls "$restore"/resume.tar.part-* >/dev/null 2>&1; then
  cat "$restore"/resume.tar.part-* | tar xf - -C "$run"
  echo "restored $(du -sh "$run" | cut -f1) from $restore"
fi

# The CLIP, while its budget lasts (its own process, beside the LDM on the same GPU)
clip_left=$(python3 -c "import json,os; p='$run/clip/clip_metrics.json'; s=json.load(open(p))['seconds'] if os.path.exists(p) else 0; print(max(0.0, $clip - s / 60))")
clip_pid=
if python3 -c "import sys; sys.exit(not $clip_left > 0.05)"; then
  python3 -m diffedit.shapes.train_clip --out "$run/clip" --minutes "$(python3 -c "print(min($clip_left, $minutes - 1.5))")" \
    --total-minutes "$clip" --pool 100000 --resume >> "$run/clip.log" 2>&1 &
  clip_pid=$!
fi

# The LDM (always --resume: a run folder without a checkpoint starts fresh)
python3 -m diffedit.shapes.train --out "$run/ldm" --vae-minutes "$vae" --unet-minutes "$unet" --pool 150000 --vae-batch 256 \
  --minutes "$minutes" --resume 2>&1 | grep -v "should be kept in float32" | tee -a "$run/ldm.log"
if [ -n "$clip_pid" ]; then
  wait "$clip_pid" || { cat "$run/clip.log"; exit 1; }
fi
grep -v Warning "$run/clip.log" | tail -3

if [ -n "$backup" ]; then
  mkdir -p "$backup"
  rm -f "$backup"/resume.tar.part-* "$backup"/result.tar.part-*
  keep=(ldm/ckpt/progress.json ldm/ckpt/vae.safetensors ldm/ckpt/ema_unet.safetensors ldm/ckpt/ema_text.safetensors
        ldm/loss_vae.csv ldm/loss_unet.csv ldm.log clip.log)
  if [ -f "$run/clip/clip_metrics.json" ]; then keep+=(clip/clip_metrics.json clip/loss_clip.csv clip/shapes-clip); fi
  if python3 -c "import sys; sys.exit(not $clip_left > $minutes - 1.5)"; then keep+=(clip/ckpt_clip.pt); fi  # CLIP not done
  existing=(); for f in "${keep[@]}"; do [ -e "$run/$f" ] && existing+=("$f"); done
  tar cf - -C "$run" "${existing[@]}" | split -b 15m - "$backup/resume.tar.part-"
  tar cf - -C "$run" ldm/model ldm/metrics.json ldm/loss.png ldm.log clip/shapes-clip clip/loss_clip.csv \
    clip/clip_metrics.json clip.log 2>/dev/null | split -b 15m - "$backup/result.tar.part-" || true
  ls -la "$backup"
fi
