#!/usr/bin/env bash
# Multi-host Cloud TPU VM launcher for mixat_jax (MixAT spec §9: compute; DESIGN.md rule 5).
#
# Usage:
#   PROJECT=my-proj ZONE=us-central2-b TPU_NAME=mixat-v4 ACCELERATOR_TYPE=v4-32 \
#   CONFIG=configs/zephyr_7b_mixat.py WORKDIR=gs://my-bucket/runs/zephyr \
#     launch/tpu_vm.sh all            # create + copy + setup + run
#   launch/tpu_vm.sh create|copy|setup|run|logs|ssh|delete
#
# Every worker runs `python -m $ENTRY --config $CONFIG --workdir $WORKDIR $EXTRA_ARGS`
# with MIXAT_JAX_DISTRIBUTED=1, which makes the entry point call jax.distributed.initialize() (on
# TPU VMs the coordinator and process ids are discovered automatically). ENTRY defaults to
# mixat_jax.train; DAT Stage A (sampling and selection) is
#   ENTRY=mixat_jax.dat_sample CONFIG=configs/dat/sample.py WORKDIR=... launch/tpu_vm.sh run
set -euo pipefail

PROJECT="${PROJECT:?set PROJECT (gcloud project id)}"
ZONE="${ZONE:?set ZONE (e.g. us-central2-b)}"
TPU_NAME="${TPU_NAME:?set TPU_NAME (name of the TPU VM)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/zephyr_7b_mixat.py}"
ENTRY="${ENTRY:-mixat_jax.train}"
WORKDIR="${WORKDIR:?set WORKDIR (gs://bucket/path, shared by all workers)}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_DIR="${REMOTE_DIR:-mixat_jax}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
JAX_EXTRA="${JAX_EXTRA:-jax[tpu]}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU=(gcloud compute tpus tpu-vm --project="${PROJECT}" --zone="${ZONE}")

create() {
  local flags=(--accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
  if [[ "${PREEMPTIBLE}" == "1" ]]; then flags+=(--preemptible); fi
  "${TPU[@]}" create "${TPU_NAME}" "${flags[@]}"
}

copy() {
  local tarball
  tarball="$(mktemp -d)/mixat_jax.tar.gz"
  (cd "${REPO_ROOT}" && git ls-files -co --exclude-standard -z \
    | tar --null -czf "${tarball}" -T -)
  "${TPU[@]}" scp "${tarball}" "${TPU_NAME}:~/mixat_jax.tar.gz" --worker=all
  "${TPU[@]}" ssh "${TPU_NAME}" --worker=all \
    --command="mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/mixat_jax.tar.gz -C ~/${REMOTE_DIR}"
}

setup() {
  "${TPU[@]}" ssh "${TPU_NAME}" --worker=all --command="set -e; cd ~/${REMOTE_DIR};
    python3 -m venv .venv; . .venv/bin/activate; pip install -q --upgrade pip;
    pip install -q -r requirements.txt; pip install -q -U '${JAX_EXTRA}'; pip install -q -e ."
}

run() {
  local cmd="cd ~/${REMOTE_DIR} && . .venv/bin/activate && MIXAT_JAX_DISTRIBUTED=1 \
nohup python -m ${ENTRY} --config ${CONFIG} --workdir ${WORKDIR} ${EXTRA_ARGS} \
> ~/mixat_train.log 2>&1 &"
  "${TPU[@]}" ssh "${TPU_NAME}" --worker=all --command="${cmd}"
  echo "started on all workers; follow with: $0 logs"
}

logs() {
  "${TPU[@]}" ssh "${TPU_NAME}" --worker=0 --command="tail -n 50 -f ~/mixat_train.log"
}

case "${1:-all}" in
  create) create ;;
  copy) copy ;;
  setup) setup ;;
  run) run ;;
  logs) logs ;;
  ssh) "${TPU[@]}" ssh "${TPU_NAME}" --worker="${WORKER:-0}" ;;
  delete) "${TPU[@]}" delete "${TPU_NAME}" --quiet ;;
  all) create; copy; setup; run ;;
  *) echo "usage: $0 {create|copy|setup|run|logs|ssh|delete|all}" >&2; exit 2 ;;
esac
