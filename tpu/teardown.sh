#!/usr/bin/env bash
# Deletes the TPU VM slice (checkpoints live in the gs:// workdir and survive).
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}" --quiet
