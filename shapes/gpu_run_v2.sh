#!/usr/bin/env bash
# Train the shapes world's second models on a one-GPU machine with no internet, side by side on the same GPU, over
# one or more commands of about MINUTES each (docs/TRAINING.md): the UNet model continued from models/shapes-ldm
# ("more steps": shapes.train --init) and the rectified-flow transformer (shapes.train_flow), both on the shipped
# VAE's latents and on the same generated scenes (shared through RUN_DIR/pool).
#
#   bash shapes/gpu_run_v2.sh RUN_DIR UNET_MIN FLOW_MIN MINUTES [BACKUP_DIR]
#
# UNET_MIN and FLOW_MIN are the training budgets (minutes, over all commands); run the same command again until
# both logs say they are done. A command resumes from RUN_DIR when it is still there; on a fresh machine from the
# EMA-only checkpoints that the previous command left in $RESTORE/resume.tar.part-* (default BACKUP_DIR; fresh
# optimizers, new warm-up). With BACKUP_DIR set it leaves there, in parts of 15 MB:
#   resume.tar.part-*   what the next command needs (EMA weights and progress of both)
#   result.tar.part-*   the exported models (RUN_DIR/ldm2/model, RUN_DIR/flow/model), logs, curves, metrics
# BACKUP_RESUME names the trainers whose resume files are kept (default "ldm2 flow"; empty: none, e.g. when a larger
# UNet's fp32 EMA would not fit in BACKUP_DIR's limits and the next command runs on the same machine, from RUN_DIR).
# UNET_ARGS and FLOW_ARGS add options to the two trainers, e.g. FLOW_ARGS="--init-flow models/shapes-flow" trains
# the shipped flow model further, UNET_ARGS="--unet-lr 1e-4" lowers the UNet's peak rate and
# UNET_ARGS="--unet-channels 128,192,256 --unet-lr 4e-4" trains a fresh, larger UNet beside the shipped model's VAE and
# text encoder instead of continuing its UNet (docs/TRAINING.md).
# Run from the repository root. What the machine lacks (diffusers) is installed from the wheels in $WHEELS
# (default .whl) by bench/on_gpu.sh, which also makes the repository importable and then runs this script again.
set -euo pipefail
if [ -z "${DIFFEDIT_ON_GPU:-}" ]; then
  DIFFEDIT_ON_GPU=1 exec bash bench/on_gpu.sh bash "$0" "$@"
fi
run=${1:?run dir}; unet=${2:?unet minutes}; flow=${3:?flow minutes}; minutes=${4:?minutes}; backup=${5:-}
restore=${RESTORE:-$backup}
mkdir -p "$run"
if [ ! -f "$run/ldm2/ckpt/progress.json" ] && [ -n "$restore" ] && ls "$restore"/resume.tar.part-* >/dev/null 2>&1; then
  cat "$restore"/resume.tar.part-* | tar xf - -C "$run"
  echo "restored $(du -sh "$run" | cut -f1) from $restore"
fi
common=(--init models/shapes-ldm --minutes "$minutes" --pool 150000 --pool-cache "$run/pool" --resume)
python3 -m diffedit.shapes.train_flow --out "$run/flow" --total-minutes "$flow" "${common[@]}" ${FLOW_ARGS:-} >> "$run/flow.log" 2>&1 &
flow_pid=$!
python3 -m diffedit.shapes.train --out "$run/ldm2" --unet-minutes "$unet" --unet-lr 2e-4 "${common[@]}" ${UNET_ARGS:-} 2>&1 \
  | grep -v "should be kept in float32" | tee -a "$run/ldm2.log"
wait "$flow_pid" || { tail -30 "$run/flow.log"; exit 1; }
grep -v -i "warn\|cannot be saved\|shards" "$run/flow.log" | tail -4

if [ -n "$backup" ]; then
  mkdir -p "$backup"
  rm -f "$backup"/resume.tar.part-* "$backup"/result.tar.part-*
  keep=(ldm2/ckpt/progress.json ldm2/ckpt/ema_unet.safetensors ldm2/ckpt/ema_text.safetensors ldm2/loss_unet.csv ldm2.log
        flow/ckpt/progress.json flow/ckpt/ema_transformer.safetensors flow/ckpt/ema_text.safetensors
        flow/ckpt/ema_text_2.safetensors flow/loss_flow.csv flow.log)
  existing=(); for f in "${keep[@]}"; do [ -e "$run/$f" ] && [[ " ${BACKUP_RESUME-ldm2 flow} " == *" ${f%%[/.]*} "* ]] && existing+=("$f"); done
  [ ${#existing[@]} -gt 0 ] && tar cf - -C "$run" "${existing[@]}" | split -b 15m - "$backup/resume.tar.part-"
  tar cf - -C "$run" ldm2/model ldm2/metrics.json ldm2/loss_unet.csv ldm2.log flow/model flow/metrics.json \
    flow/loss_flow.csv flow.log 2>/dev/null | split -b 15m - "$backup/result.tar.part-" || true
  ls -la "$backup"
fi
