#!/usr/bin/env bash
# Runs one training command on every worker at once (multi-host SPMD: each host runs the same program).
#   tpu/launch.sh configs/deepseek_v3_671b_pretrain.py --config.workdir=gs://bucket/run1 [--config.key=value ...]
# Output of each worker goes to ~/jaxopd_train.log on that worker; worker 0 writes metrics and TensorBoard events.
# Relaunching the same command resumes from the newest checkpoint in the workdir.
set -euo pipefail
source "$(dirname "$0")/env.sh"
CONFIG="$1"; shift
ARGS="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker=all --command "
  cd $REPO_DIR && nohup python3 -m jaxopd.train --config=$CONFIG --config.distributed.auto_detect=True $ARGS \
    > ~/jaxopd_train.log 2>&1 & echo \$! > ~/jaxopd_train.pid
"
echo "launched on all workers; follow worker 0 with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME ${TPU_FLAGS[*]} --worker=0 --command 'tail -f ~/jaxopd_train.log'"
