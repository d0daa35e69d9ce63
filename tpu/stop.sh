#!/usr/bin/env bash
# Sends SIGTERM to the trainer on every worker: it saves a checkpoint at the next step and exits (as on preemption).
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker=all \
  --command 'kill -TERM "$(cat ~/jaxopd_train.pid)" || true'
