#!/usr/bin/env bash
# GKE launcher through xpk for mixat_jax on TPU slices (MixAT spec §9; DESIGN.md rule 5;
# issue #16: jax[tpu] installed in the same resolver call as requirements.txt, env vars passed).
#
# Usage:
#   PROJECT=my-proj ZONE=us-east5-b CLUSTER=my-xpk-cluster TPU_TYPE=v5p-32 \
#   CONFIG=configs/llama3_8b_mixat.py WORKDIR=gs://my-bucket/runs/llama3 \
#   ENV_VARS="HF_TOKEN MIXAT_DATA_DIR=/data/harmbench" \
#     launch/xpk.sh create             # submit the workload
#   launch/xpk.sh list | delete
#   DRY_RUN=1 launch/xpk.sh create    # print the xpk command and the per-host command only
#
# The container image (BASE_IMAGE, a JAX TPU image with Python >= 3.11) gets this repository as
# its working directory (xpk --script-dir) and runs on every host of every slice
#   pip install -r requirements.txt 'jax[tpu]' && pip install --no-deps -e . &&
#   MIXAT_JAX_DISTRIBUTED=1 exec python -m $ENTRY --config $CONFIG --workdir $WORKDIR $EXTRA_ARGS
# (exec: xpk forwards the pod's SIGTERM to this command's process, which must be python).
# JAX_SPEC=image pins jax[tpu] to the image's own jax version instead (keeps its libtpu).
# ENTRY (default mixat_jax.train) picks the entry point: ENTRY=mixat_jax.dat_sample runs DAT
# Stage A, which needs a shared *filesystem* WORKDIR mounted in every pod (not gs://).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "${REPO_ROOT}/launch/lib.sh"

ACTION="${1:-create}"
case "${ACTION}" in
  create | list | delete) ;;
  *) die "unknown action '${ACTION}' (usage: $0 {create|list|delete})" ;;
esac

require PROJECT "gcloud project id"
require ZONE "e.g. us-east5-b"
require CLUSTER "an xpk GKE cluster"
TPU_TYPE="${TPU_TYPE:-v5p-32}"
NUM_SLICES="${NUM_SLICES:-1}"
CONFIG="${CONFIG:-configs/zephyr_7b_mixat.py}"
ENTRY="${ENTRY:-mixat_jax.train}"
BASE_IMAGE="${BASE_IMAGE:-us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
COMMON=(--project="${PROJECT}" --zone="${ZONE}" --cluster="${CLUSTER}")

if [[ "${ACTION}" == "delete" ]]; then require WORKLOAD "the workload name printed by create"; fi
WORKLOAD="${WORKLOAD:-mixat-$(date +%m%d-%H%M%S)}"

create() {
  require WORKDIR "gs://bucket/path"
  check_config "${CONFIG}"
  check_stage_a_workdir
  check_shared_workdir 2
  local jax_req="'${JAX_SPEC}'"
  if [[ "${JAX_SPEC}" == "image" ]]; then
    jax_req="\"jax[tpu]==\$(python -c 'import jax; print(jax.__version__)')\""
  fi
  local command="python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
|| { echo 'error: the image Python is older than 3.11; set BASE_IMAGE to a newer JAX TPU image' >&2; exit 2; }; \
pip install -q -r requirements.txt ${jax_req} 'etils[epath-gcs]' && pip install -q --no-deps -e . \
&& MIXAT_JAX_DISTRIBUTED=1 exec python -m ${ENTRY} --config ${CONFIG} --workdir ${WORKDIR}${EXTRA_ARGS:+ ${EXTRA_ARGS}}"

  # The environment (HF_TOKEN, MIXAT_DATA_DIR, ENV_VARS) goes through an xpk --env-file (mode 600,
  # removed afterwards); xpk writes it into the JobSet's container env.
  collect_env
  local envfile=/tmp/mixat_jax_xpk_env i
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "# ${envfile} (credentials redacted here):"
    for i in "${!ENV_NAMES[@]}"; do
      if is_secret_name "${ENV_NAMES[$i]}"; then
        echo "#   ${ENV_NAMES[$i]}=<redacted>"
      else
        echo "#   ${ENV_NAMES[$i]}=${ENV_VALUES[$i]}"
      fi
    done
  else
    envfile="$(mktemp)"
    chmod 600 "${envfile}"
    for i in "${!ENV_NAMES[@]}"; do
      if [[ "${ENV_VALUES[$i]}" == *$'\n'* ]]; then die "${ENV_NAMES[$i]} holds a newline, which xpk --env-file cannot carry"; fi
      echo "${ENV_NAMES[$i]}=${ENV_VALUES[$i]}" >>"${envfile}"
    done
  fi
  local hosts
  hosts="$( (tpu_num_workers "${TPU_TYPE}") 2>/dev/null || echo "?")"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "# ${TPU_TYPE} x ${NUM_SLICES} slice(s): ${hosts} host(s) per slice, each runs the --command below"
  fi
  local rc=0
  # A preempted/restarted workload (up to MAX_RESTARTS) resumes from the checkpoints in WORKDIR.
  run_cmd xpk workload create "${COMMON[@]}" \
    --workload="${WORKLOAD}" \
    --tpu-type="${TPU_TYPE}" \
    --num-slices="${NUM_SLICES}" \
    --base-docker-image="${BASE_IMAGE}" \
    --script-dir="${REPO_ROOT}" \
    --max-restarts="${MAX_RESTARTS}" \
    --env-file="${envfile}" \
    --command="${command}" || rc=$?
  if [[ "${DRY_RUN:-0}" != "1" ]]; then rm -f "${envfile}"; fi
  if ((rc != 0)); then exit "${rc}"; fi
  if [[ "${DRY_RUN:-0}" != "1" ]]; then echo "submitted ${WORKLOAD}"; fi
}

case "${ACTION}" in
  create) create ;;
  list) run_cmd xpk workload list "${COMMON[@]}" ;;
  delete) run_cmd xpk workload delete "${COMMON[@]}" --workload="${WORKLOAD}" ;;
esac
