#!/usr/bin/env bash
# Multi-host Cloud TPU VM launcher for mixat_jax (MixAT spec §9: compute; DESIGN.md rule 5;
# issue #16: runtime by accelerator type, Python >= 3.11 through uv, jax[tpu] resolved together
# with requirements.txt, environment forwarded to every worker, one log per worker).
#
# Usage:
#   PROJECT=my-proj ZONE=us-west4-a TPU_NAME=mixat-v5e ACCELERATOR_TYPE=v5litepod-32 \
#   CONFIG=configs/zephyr_7b_mixat.py WORKDIR=gs://my-bucket/runs/zephyr \
#   ENV_VARS="HF_TOKEN MIXAT_DATA_DIR=data/harmbench" \
#     launch/tpu_vm.sh all            # create + copy + setup + run
#   launch/tpu_vm.sh create|copy|setup|run|logs|stop|ssh|delete
#   DRY_RUN=1 launch/tpu_vm.sh all    # print every gcloud command (per worker), run nothing
#
# Every worker runs `python -m $ENTRY --config $CONFIG --workdir $WORKDIR $EXTRA_ARGS` with
# MIXAT_JAX_DISTRIBUTED=1 (the entry point calls jax.distributed.initialize(); on TPU VMs the
# coordinator and process ids are discovered automatically) and writes ~/$REMOTE_DIR/logs/worker<i>.log.
# ENTRY defaults to mixat_jax.train; DAT Stage A is ENTRY=mixat_jax.dat_sample with a shared
# *filesystem* WORKDIR (e.g. a Filestore mount on every worker), never gs://.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "${REPO_ROOT}/launch/lib.sh"

ACTION="${1:-all}"
case "${ACTION}" in
  create | copy | setup | run | logs | stop | ssh | delete | all) ;;
  *) die "unknown action '${ACTION}' (usage: $0 {create|copy|setup|run|logs|stop|ssh|delete|all})" ;;
esac

require PROJECT "gcloud project id"
require ZONE "e.g. us-west4-a for v5e, us-central2-b for v4"
require TPU_NAME "name of the TPU VM"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
if [[ -z "${RUNTIME_VERSION:-}" ]]; then RUNTIME_VERSION="$(tpu_runtime "${ACCELERATOR_TYPE}")"; fi
if [[ -z "${NUM_WORKERS:-}" ]]; then NUM_WORKERS="$(tpu_num_workers "${ACCELERATOR_TYPE}")"; fi
CONFIG="${CONFIG:-configs/zephyr_7b_mixat.py}"
ENTRY="${ENTRY:-mixat_jax.train}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_DIR="${REMOTE_DIR:-mixat_jax}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
SPOT="${SPOT:-0}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_SPEC="${JAX_SPEC:-${JAX_EXTRA:-jax[tpu]}}"  # JAX_EXTRA: the older name
if [[ "${ACTION}" == "run" || "${ACTION}" == "all" ]]; then
  require WORKDIR "gs://bucket/path, shared by all workers"
  check_config "${CONFIG}"
  check_stage_a_workdir
  check_shared_workdir "${NUM_WORKERS}"
fi

TPU=(gcloud compute tpus tpu-vm)
LOC=(--project="${PROJECT}" --zone="${ZONE}")
# shellcheck disable=SC2088  # the ~ expands on the worker
REMOTE="~/${REMOTE_DIR}"

create() {
  local flags=(--accelerator-type="$(tpu_gcloud_type "${ACCELERATOR_TYPE}")" --version="${RUNTIME_VERSION}")
  if [[ "${PREEMPTIBLE}" == "1" ]]; then flags+=(--preemptible); fi
  if [[ "${SPOT}" == "1" ]]; then flags+=(--spot); fi
  run_cmd "${TPU[@]}" create "${TPU_NAME}" "${LOC[@]}" "${flags[@]}"
}

copy() {
  local tarball=/tmp/mixat_jax_src.tar.gz
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "+ (cd ${REPO_ROOT} && git ls-files -co --exclude-standard -z -- . ':(exclude).cache' | tar --null -czf ${tarball} -T -)"
  else
    tarball="$(mktemp -d)/mixat_jax_src.tar.gz"
    (cd "${REPO_ROOT}" && git ls-files -co --exclude-standard -z -- . ':(exclude).cache' | tar --null -czf "${tarball}" -T -)
  fi
  run_cmd "${TPU[@]}" scp "${tarball}" "${TPU_NAME}:~/mixat_jax_src.tar.gz" "${LOC[@]}" --worker=all
  run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker=all \
    --command="mkdir -p ${REMOTE} && tar -xzf ~/mixat_jax_src.tar.gz -C ${REMOTE}"
}

# The TPU VM images are Ubuntu 22.04 (Python 3.10); the project needs >= 3.11. uv provides a
# managed Python in the venv, and one resolver call over requirements.txt + jax[tpu] keeps jax,
# jaxlib and libtpu at matching versions; the `gcs` extra (gcsfs) lets etils.epath write the gs:// workdir.
setup() {
  local cmd="set -euo pipefail; cd ${REMOTE}; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh; \
[ -x .venv/bin/python ] || uv venv --python ${PYTHON_VERSION} --seed .venv; \
uv pip install --python .venv/bin/python -r requirements.txt '${JAX_SPEC}' -e '.[gcs]'; \
.venv/bin/python -c 'import sys, jax, importlib.metadata as m; print(sys.version.split()[0], jax.__version__, m.version(\"libtpu\"))'"
  run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker=all --command="${cmd}"
}

# The environment goes to every worker as a file (mode 600, not on any command line).
run() {
  collect_env
  local envfile=/tmp/mixat_jax_launch_env
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "# ${envfile} (copied to ${REMOTE}/.launch_env on every worker; credentials redacted here):"
    env_exports mask | sed 's/^/#   /'
  else
    envfile="$(mktemp)"
    chmod 600 "${envfile}"
    env_exports >"${envfile}"
  fi
  run_cmd "${TPU[@]}" scp "${envfile}" "${TPU_NAME}:${REMOTE}/.launch_env" "${LOC[@]}" --worker=all
  if [[ "${DRY_RUN:-0}" != "1" ]]; then rm -f "${envfile}"; fi
  local i pids=()
  for ((i = 0; i < NUM_WORKERS; i++)); do
    local cmd="cd ${REMOTE} && chmod 600 .launch_env && . ./.launch_env && mkdir -p logs \
&& echo \"== \$(date -u) ${ENTRY} worker ${i}\" >> logs/worker${i}.log \
&& { MIXAT_JAX_DISTRIBUTED=1 setsid nohup .venv/bin/python -m ${ENTRY} --config ${CONFIG} --workdir ${WORKDIR}${EXTRA_ARGS:+ ${EXTRA_ARGS}} \
>> logs/worker${i}.log 2>&1 < /dev/null & echo \$! > logs/worker${i}.pid; }"
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
      run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker="${i}" --command="${cmd}"
    else
      run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker="${i}" --command="${cmd}" &
      pids+=($!)
    fi
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "${pid}" || rc=1; done
  if ((rc != 0)); then die "starting the run failed on at least one worker (see the gcloud output above)"; fi
  local verb=started
  if [[ "${DRY_RUN:-0}" == "1" ]]; then verb="would start"; fi
  echo "${verb} ${ENTRY} on ${NUM_WORKERS} workers; logs: ${REMOTE}/logs/worker<i>.log on worker i; 'launch/tpu_vm.sh logs' tails them all"
}

# Last LOG_LINES lines of every worker's log (WORKER=i FOLLOW=1 follows one worker).
logs() {
  local i lines="${LOG_LINES:-20}"
  if [[ "${FOLLOW:-0}" == "1" ]]; then
    run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker="${WORKER:-0}" \
      --command="tail -n ${lines} -f ${REMOTE}/logs/worker${WORKER:-0}.log"
    return
  fi
  for ((i = 0; i < NUM_WORKERS; i++)); do
    echo "==> worker ${i}: ${REMOTE}/logs/worker${i}.log"
    run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker="${i}" \
      --command="tail -n ${lines} ${REMOTE}/logs/worker${i}.log" || true
  done
}

# SIGTERM to every worker's process: the run checkpoints at an agreed step and exits (143).
stop() {
  run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker=all \
    --command="for f in ${REMOTE}/logs/worker*.pid; do kill -TERM \$(cat \$f) 2>/dev/null || true; done"
}

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "# ${ACTION}: ${TPU_NAME} ${ACCELERATOR_TYPE} (${NUM_WORKERS} workers), runtime ${RUNTIME_VERSION}"
fi
case "${ACTION}" in
  create) create ;;
  copy) copy ;;
  setup) setup ;;
  run) run ;;
  logs) logs ;;
  stop) stop ;;
  ssh) run_cmd "${TPU[@]}" ssh "${TPU_NAME}" "${LOC[@]}" --worker="${WORKER:-0}" ;;
  delete) run_cmd "${TPU[@]}" delete "${TPU_NAME}" "${LOC[@]}" --quiet ;;
  all) create && copy && setup && run ;;
esac
