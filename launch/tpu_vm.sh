#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the slice (unless it exists), copy this checkout to
# every host, install it, and run the same train command on all hosts at once. On TPU VMs
# jax.distributed.initialize() finds the coordinator and process ids itself.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR [train args...]
#   launch/tpu_vm.sh clip-v4 us-central2-b v4-32 --config configs/clip.py:vit_b32 \
#       --workdir gs://my-bucket/runs/vit_b32 --config.data.source=tar \
#       --config.data.shards='gs://my-bucket/laion/{00000..09999}.tar' --config.mesh.fsdp=4
#
# Environment: RUNTIME_VERSION (default tpu-ubuntu2204-base), PROJECT (gcloud default if
# unset), SPOT=1 for spot capacity, SKIP_CREATE=1 to reuse an existing slice.
# The workdir and the data should be on GCS (or another filesystem every host sees):
# orbax writes one checkpoint cooperatively from all hosts and each host reads only its shards.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR [train args...]" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 3
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")

if [[ -z "${SKIP_CREATE:-}" ]]; then
  create=(gcloud compute tpus tpu-vm create "$name" --zone "$zone"
          --accelerator-type "$accelerator" --version "$runtime" "${project_flag[@]}")
  [[ -n "${SPOT:-}" ]] && create+=(--spot)
  "${create[@]}"
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker=all \
    --command "$1"
}

# Ship this checkout (tracked files) to every host and install it with TPU jax.
archive=$(mktemp --suffix=.tar.gz)
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name:clip_jax.tar.gz" --zone "$zone" \
  "${project_flag[@]}" --worker=all
rm -f "$archive"
ssh_all "mkdir -p clip_jax && tar -xzf clip_jax.tar.gz -C clip_jax && \
  python3 -m pip install -q -U 'jax[tpu]' -e ./clip_jax"

# Same command on every host; each host logs to its own file as well as the console.
quoted=$(printf ' %q' "$@")
ssh_all "cd clip_jax && python3 -m clip_jax.train$quoted \
  --config.distributed.initialize=True 2>&1 | tee -a train_\$(hostname).log"
