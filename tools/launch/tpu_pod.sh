#!/bin/bash
# Train on every worker of a Cloud TPU pod slice (v4/v5e/v5p/v6e); run from your workstation.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a tools/launch/tpu_pod.sh experiments/my-run.yaml run_dir=/mnt/runs/my-run
# All workers run the same command; JAX detects the pod (worker hostnames, ids) by itself.
# RUN_DIR must be a mount every worker shares (Filestore NFS, or GCS through gcsfuse).
# Spot / queued-resources preemption sends SIGTERM to every worker: JAX's preemption sync point
# makes all of them save the same step and exit 0; re-create the slice and run this again.
# Multislice (MEGASCALE_* set by queued resources): the mesh puts data across slices by default
# (mesh.dcn_data).
set -euo pipefail
CONFIG=${1:?usage: tools/launch/tpu_pod.sh CONFIG.yaml run_dir=SHARED_DIR [key=value ...]}
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-mpt_jax}

# quoted for the workers' shell: an override such as 'optim.betas=[0.9, 0.95]' stays one argument
ARGS=$(printf ' %q' "$CONFIG" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command="
  cd $REPO && .venv/bin/mpt-jax train$ARGS --max-restarts 5
"
