#!/usr/bin/env bash
# Installs jaxopd with the TPU extra on every worker of the slice (same code on every host is required).
set -euo pipefail
source "$(dirname "$0")/env.sh"
REF="${REF:-main}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker=all --command "
  set -e
  [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR
  cd $REPO_DIR && git fetch -q && git checkout -q $REF
  git pull -q --ff-only || true  # a tag or commit REF has nothing to pull
  python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'
  if [ -n \"$BUCKET\" ]; then sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && \\
    (mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs $BUCKET /mnt/gcs); fi
  python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'
"
