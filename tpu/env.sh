# Shared settings for the tpu/ scripts; override any of them in the environment.
# RUNTIME: the TPU VM image for the accelerator generation (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite,
# v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
TPU_NAME="${TPU_NAME:-jaxopd}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR="${ACCELERATOR:-v5p-2048}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
REPO_URL="${REPO_URL:-https://github.com/YOUR_ORG/jaxopd.git}"
REPO_DIR="${REPO_DIR:-jaxopd}"
TPU_FLAGS=(--zone="$ZONE" --project="$PROJECT")
# The workdir must be shared by all workers: a gcsfuse mount of a bucket (setup.sh mounts BUCKET at /mnt/gcs).
BUCKET="${BUCKET:-}"
