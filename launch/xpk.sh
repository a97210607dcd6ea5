#!/usr/bin/env bash
# GKE launcher through xpk for mixat_jax on TPU slices (MixAT spec §9; DESIGN.md rule 5).
#
# Usage:
#   PROJECT=my-proj ZONE=us-east5-b CLUSTER=my-xpk-cluster TPU_TYPE=v5p-32 \
#   CONFIG=configs/mixat_llama3.py WORKDIR=gs://my-bucket/runs/llama3 \
#     launch/xpk.sh create             # submit the workload
#   launch/xpk.sh list | delete
#
# The container image (BASE_IMAGE, default a JAX TPU image) gets this repository as its
# working directory (xpk --script-dir) and runs
#   pip install -r requirements.txt && MIXAT_JAX_DISTRIBUTED=1 python -m mixat_jax.train ...
# on every host of every slice; the entry point calls jax.distributed.initialize(). ENTRY
# (default mixat_jax.train) picks the entry point: ENTRY=mixat_jax.dat_sample runs DAT Stage A.
set -euo pipefail

PROJECT="${PROJECT:?set PROJECT (gcloud project id)}"
ZONE="${ZONE:?set ZONE (e.g. us-east5-b)}"
CLUSTER="${CLUSTER:?set CLUSTER (an xpk GKE cluster)}"
TPU_TYPE="${TPU_TYPE:-v5p-32}"
NUM_SLICES="${NUM_SLICES:-1}"
CONFIG="${CONFIG:-configs/zephyr_7b_mixat.py}"
ENTRY="${ENTRY:-mixat_jax.train}"
WORKDIR="${WORKDIR:?set WORKDIR (gs://bucket/path)}"
WORKLOAD="${WORKLOAD:-mixat-$(date +%m%d-%H%M%S)}"
BASE_IMAGE="${BASE_IMAGE:-us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMON=(--project="${PROJECT}" --zone="${ZONE}" --cluster="${CLUSTER}")

COMMAND="pip install -q -r requirements.txt && pip install -q -e . && \
MIXAT_JAX_DISTRIBUTED=1 python -m ${ENTRY} --config ${CONFIG} --workdir ${WORKDIR} \
${EXTRA_ARGS}"

case "${1:-create}" in
  create)
    # A preempted/restarted workload resumes from the orbax checkpoints in WORKDIR.
    xpk workload create "${COMMON[@]}" \
      --workload="${WORKLOAD}" \
      --tpu-type="${TPU_TYPE}" \
      --num-slices="${NUM_SLICES}" \
      --base-docker-image="${BASE_IMAGE}" \
      --script-dir="${REPO_ROOT}" \
      --max-restarts="${MAX_RESTARTS}" \
      --command="${COMMAND}"
    echo "submitted ${WORKLOAD}"
    ;;
  list) xpk workload list "${COMMON[@]}" ;;
  delete) xpk workload delete "${COMMON[@]}" --workload="${WORKLOAD}" ;;
  *) echo "usage: $0 {create|list|delete}" >&2; exit 2 ;;
esac
