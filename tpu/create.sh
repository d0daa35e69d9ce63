#!/usr/bin/env bash
# Creates the TPU VM slice. SPOT=1 asks for preemptible capacity (the trainer saves on SIGTERM; relaunch resumes).
set -euo pipefail
source "$(dirname "$0")/env.sh"
extra=()
[[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}" \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
