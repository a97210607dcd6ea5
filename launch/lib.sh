# Shared helpers of the launch/ scripts (issue #16): one-line errors, a dry-run printer, the
# environment forwarded to every worker/rank, and the Cloud TPU runtime/worker tables.
# Sourced by tpu_vm.sh, xpk.sh and slurm_gpu.sbatch; not executable on its own.
# shellcheck shell=bash

die() {
  echo "error: $*" >&2
  exit 2
}

# require NAME "hint": the variable must be set and non-empty.
require() {
  if [[ -z "${!1:-}" ]]; then die "set $1 ($2)"; fi
}

# quote_args ARG...: the arguments as one copy-pasteable shell line (single-quoted where needed).
quote_args() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# run_cmd CMD...: run it, or with DRY_RUN=1 print it ("+ ...") and do nothing.
run_cmd() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "+ $(quote_args "$@")"
  else
    "$@"
  fi
}

# A value is masked in dry-run output when its name looks like a credential.
is_secret_name() {
  [[ "$1" =~ (TOKEN|SECRET|PASSWORD|KEY|CREDENTIAL) ]]
}

# Variables forwarded to every worker/rank when they are set here, before ENV_VARS.
FORWARDED_BY_DEFAULT=(HF_TOKEN MIXAT_DATA_DIR HF_HUB_OFFLINE)

# collect_env: fills ENV_NAMES / ENV_VALUES from FORWARDED_BY_DEFAULT (those set here) and ENV_VARS
# (space-separated `NAME=value`, or `NAME` to take its value from this shell; unset NAME fails).
collect_env() {
  ENV_NAMES=()
  ENV_VALUES=()
  local name entry value
  for name in "${FORWARDED_BY_DEFAULT[@]}"; do
    if [[ -n "${!name:-}" ]]; then
      ENV_NAMES+=("$name")
      ENV_VALUES+=("${!name}")
    fi
  done
  for entry in ${ENV_VARS:-}; do
    name="${entry%%=*}"
    if [[ ! "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
      die "ENV_VARS entry '${entry}' is not NAME or NAME=value"
    fi
    if [[ "$entry" == *=* ]]; then
      value="${entry#*=}"
    elif [[ -n "${!name+x}" ]]; then
      value="${!name}"
    else
      die "ENV_VARS names ${name}, which is not set here (export it or write ${name}=value)"
    fi
    local i
    for i in "${!ENV_NAMES[@]}"; do
      if [[ "${ENV_NAMES[$i]}" == "$name" ]]; then
        unset 'ENV_NAMES[i]' 'ENV_VALUES[i]'
      fi
    done
    ENV_NAMES=("${ENV_NAMES[@]}")
    ENV_VALUES=("${ENV_VALUES[@]}")
    ENV_NAMES+=("$name")
    ENV_VALUES+=("$value")
  done
}

# env_exports [mask]: `export NAME=value` lines of the collected environment (values of
# credential-like names replaced by <redacted> when mask is given).
env_exports() {
  local i value
  for i in "${!ENV_NAMES[@]}"; do
    value="${ENV_VALUES[$i]}"
    if [[ -n "${1:-}" ]] && is_secret_name "${ENV_NAMES[$i]}"; then value="<redacted>"; fi
    echo "export ${ENV_NAMES[$i]}=$(quote_args "$value")"
  done
}

# check_config PATH[:ARG]: the config file exists (relative to the repository root).
check_config() {
  local file="${1%%:*}"
  if [[ ! -f "${REPO_ROOT}/${file}" ]]; then
    die "CONFIG ${file} does not exist under ${REPO_ROOT} (see configs/, e.g. configs/zephyr_7b_mixat.py)"
  fi
}

# check_stage_a_workdir: DAT Stage A writes shards with plain file I/O, so no gs:// workdir.
# shellcheck disable=SC2153  # ENTRY/WORKDIR are set by the calling script
check_stage_a_workdir() {
  if [[ "${ENTRY}" == "mixat_jax.dat_sample" && "${WORKDIR}" == *://* ]]; then
    die "ENTRY=mixat_jax.dat_sample needs a shared filesystem WORKDIR, not ${WORKDIR} (mount Filestore/NFS on every host)"
  fi
}

# check_shared_workdir HOSTS: with several hosts a relative WORKDIR would be one directory per host.
check_shared_workdir() {
  if (($1 > 1)) && [[ "${WORKDIR}" != *://* && "${WORKDIR}" != /* ]]; then
    die "WORKDIR ${WORKDIR} is relative: each of the $1 hosts would write its own copy (use gs://... or a shared mount's absolute path)"
  fi
}

# tpu_generation TYPE: v2 | v3 | v4 | v5e | v5p | v6e, from an accelerator type such as v4-32,
# v5litepod-16 (or v5e-16), v5p-128, v6e-64; anything else fails with one line.
tpu_generation() {
  case "$1" in
    v2-[0-9]*) echo v2 ;;
    v3-[0-9]*) echo v3 ;;
    v4-[0-9]*) echo v4 ;;
    v5litepod-[0-9]* | v5e-[0-9]*) echo v5e ;;
    v5p-[0-9]*) echo v5p ;;
    v6e-[0-9]*) echo v6e ;;
    *) die "unknown ACCELERATOR_TYPE '$1' (known: v2-N, v3-N, v4-N, v5litepod-N/v5e-N, v5p-N, v6e-N; for others set RUNTIME_VERSION and NUM_WORKERS)" ;;
  esac
}

# tpu_runtime TYPE: the TPU VM software version for JAX on that generation (Cloud TPU
# "TPU software versions": v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
# v4 and older tpu-ubuntu2204-base).
tpu_runtime() {
  local gen
  gen="$(tpu_generation "$1")" || exit 2
  case "$gen" in
    v6e) echo v2-alpha-tpuv6e ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v5e) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# tpu_num_workers TYPE: hosts (TPU VM workers) of a slice. v2/v3/v4/v5p count TensorCores in the
# type name (8 per host); v5e/v6e count chips (one host up to 8 chips, 4 chips per host above).
tpu_num_workers() {
  local gen n
  gen="$(tpu_generation "$1")" || exit 2
  n="${1##*-}"
  case "$gen" in
    v5e | v6e) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) if ((n <= 8)); then echo 1; else echo $((n / 8)); fi ;;
  esac
}

# gcloud names the v5e accelerator type v5litepod-N.
tpu_gcloud_type() {
  case "$1" in
    v5e-[0-9]*) echo "v5litepod-${1##*-}" ;;
    *) echo "$1" ;;
  esac
}
