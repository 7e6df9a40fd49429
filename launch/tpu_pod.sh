#!/usr/bin/env bash
# Cloud TPU VM pod slice: run xlm_jax on every worker (host) of the slice at once.
#
#   TPU_NAME=my-pod ZONE=us-central2-b [PROJECT=my-project] \
#     [REPO_URL=https://github.com/you/xlm_jax.git] [REPO_DIR=xlm_jax] \
#     launch/tpu_pod.sh -- --config=configs/xnli15_mlm_tlm.py --workdir=/mnt/shared/xlm_run
#
# What it does, with `gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all`:
#   1. only if REPO_URL is set: on every worker, clone it into REPO_DIR (or fast-forward an
#      existing clone; check out REPO_REF if given), then
#        pip install -r requirements.txt 'jax[tpu]' && pip install -e .
#   2. on every worker, in REPO_DIR (if set):
#        python3 -m xlm_jax.main --multihost MAIN_ARGS...
#      jax.distributed.initialize detects the TPU slice by itself (worker id, worker addresses, the
#      coordinator), so no coordinator address, process count or id is passed.
# Every worker runs the same command; all must see the same workdir (see launch/README.md).
#
# Environment:
#   TPU_NAME, ZONE   required: the TPU VM (pod slice) and its zone
#   PROJECT          optional: GCP project (default: gcloud's configured project)
#   REPO_URL         optional: git URL to clone and install on all workers before the run
#   REPO_DIR         directory on the workers (relative to the login home); default xlm_jax when
#                    REPO_URL is set, else none (the package must already be importable)
#                    (paths are passed quoted: write them relative or absolute, not with `~`)
#   REPO_REF         optional: branch, tag or commit to check out after cloning/fetching
#   REMOTE_PYTHON    interpreter on the workers (default python3)
#   REMOTE_VENV      optional: a venv on the workers (created at setup) to install into and run
#   GCLOUD_SSH_FLAGS optional extra flags for `gcloud ... ssh`, split on spaces (e.g. --internal-ip)
#   DETACH=1         start the run under nohup on each worker and return at once; its output goes
#                    to REMOTE_LOG (default xlm_jax_train.log in the login home) on every worker.
#                    Without it the run lives as long as this ssh session (Ctrl-C stops it).
#   DRY_RUN=1        only print the gcloud commands, run nothing
#   AOT_TOPOLOGY     the slice type for the compile check below, e.g. v5e-256, v4-128 or gcloud's
#                    v5litepod-256; default: asked from gcloud (tpus tpu-vm describe)
#   AOT_CHECK=0      skip that check; AOT_PYTHON: the local interpreter for it (default python3)
#
# Before anything runs on the workers, this machine compiles every program of the run for the
# slice (`python -m xlm_jax.aot --topology=... <the --config and --mode arguments>`: the real TPU
# compiler from libtpu, no TPU needed) and stops if one does not compile or fit in HBM. It needs
# xlm_jax and libtpu here: pip install -e . 'jax[tpu]==<the pinned jax>' (or AOT_CHECK=0).
#
# Exit status: gcloud's (non-zero if the command failed on any worker); 2 for a usage error;
# 3 when the compile check fails (nothing was started).

set -euo pipefail

usage_text() {
  cat <<'EOF'
usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=P] [REPO_URL=URL] [REPO_DIR=DIR] launch/tpu_pod.sh -- MAIN_ARGS...

Runs `python3 -m xlm_jax.main --multihost MAIN_ARGS...` on all workers of a Cloud TPU VM pod slice,
e.g.  TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh -- --config=configs/demo.py --workdir=/mnt/shared/run
Optional env: PROJECT, REPO_URL, REPO_DIR, REPO_REF, REMOTE_PYTHON, REMOTE_VENV, GCLOUD_SSH_FLAGS,
DETACH=1, REMOTE_LOG, DRY_RUN=1 (see the comments at the top of this script).
EOF
}

usage() { # usage [EXIT_STATUS]: help on stdout for --help, on stderr (exit 2) for errors
  local rc="${1:-2}"
  if ((rc == 0)); then usage_text; else usage_text >&2; fi
  exit "$rc"
}

die_usage() {
  echo "tpu_pod.sh: error: $*" >&2
  usage
}

# --- arguments and environment ------------------------------------------------------------------

case "${1:-}" in -h | --help) usage 0 ;; esac
[[ "${1:-}" == "--" ]] || die_usage "expected '--' followed by the arguments of xlm_jax.main"
shift
MAIN_ARGS=("$@")

MISSING=()
[[ -n "${TPU_NAME:-}" ]] || MISSING+=(TPU_NAME)
[[ -n "${ZONE:-}" ]] || MISSING+=(ZONE)
((${#MISSING[@]} == 0)) || die_usage "required environment variable(s) not set: ${MISSING[*]}"

PROJECT="${PROJECT:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
REPO_DIR="${REPO_DIR:-}"
[[ -z "$REPO_URL" || -n "$REPO_DIR" ]] || REPO_DIR=xlm_jax
[[ -z "$REPO_REF" || -n "$REPO_URL" ]] || die_usage "REPO_REF needs REPO_URL (it is used at setup)"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
REMOTE_VENV="${REMOTE_VENV:-}"
REMOTE_LOG="${REMOTE_LOG:-xlm_jax_train.log}"
DETACH="${DETACH:-0}"
DRY_RUN="${DRY_RUN:-0}"
read -r -a EXTRA_SSH_FLAGS <<<"${GCLOUD_SSH_FLAGS:-}"
AOT_CHECK="${AOT_CHECK:-1}"
AOT_TOPOLOGY="${AOT_TOPOLOGY:-}"
AOT_PYTHON="${AOT_PYTHON:-python3}"

# The interpreter the workers run: the venv's, if one is used.
if [[ -n "$REMOTE_VENV" ]]; then
  PY="$REMOTE_VENV/bin/python"
else
  PY="$REMOTE_PYTHON"
fi

q() { printf '%q' "$1"; } # shell-quote one word for the remote bash

# --- the remote commands ------------------------------------------------------------------------

# 1. setup (only with REPO_URL): clone or update, then install with the TPU build of jaxlib.
SETUP_CMD=""
if [[ -n "$REPO_URL" ]]; then
  SETUP_CMD="set -eu; "
  SETUP_CMD+="if [ -d $(q "$REPO_DIR")/.git ]; then git -C $(q "$REPO_DIR") fetch --tags origin; "
  SETUP_CMD+="else git clone $(q "$REPO_URL") $(q "$REPO_DIR"); fi; "
  SETUP_CMD+="cd $(q "$REPO_DIR"); "
  [[ -z "$REPO_REF" ]] || SETUP_CMD+="git checkout $(q "$REPO_REF"); "
  # On a branch (not a detached tag/commit): bring it up to date, the same on every worker.
  SETUP_CMD+="if git symbolic-ref -q HEAD > /dev/null; then git pull --ff-only; fi; "
  if [[ -n "$REMOTE_VENV" ]]; then
    SETUP_CMD+="[ -x $(q "$PY") ] || $(q "$REMOTE_PYTHON") -m venv $(q "$REMOTE_VENV"); "
  fi
  SETUP_CMD+="$(q "$PY") -m pip install -r requirements.txt 'jax[tpu]' && "
  SETUP_CMD+="$(q "$PY") -m pip install -e ."
fi

# 2. the run. JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID would override the TPU
# auto-detection (xlm_jax.main takes them as flag defaults), so they are cleared.
RUN_CMD="unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID; "
[[ -z "$REPO_DIR" ]] || RUN_CMD+="cd $(q "$REPO_DIR") && "
RUN_CMD+="exec $(q "$PY") -m xlm_jax.main --multihost"
for arg in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
  RUN_CMD+=" $(q "$arg")"
done
if [[ "$DETACH" == 1 ]]; then
  # Survives the end of the ssh session; `tail -f ~/REMOTE_LOG` on a worker to follow it.
  RUN_CMD="nohup bash -c $(q "$RUN_CMD") > $(q "$REMOTE_LOG") 2>&1 < /dev/null & "
  RUN_CMD+="echo \"worker \$(hostname): started pid \$!, log \$PWD/\"$(q "$REMOTE_LOG")"
fi

# --- gcloud -------------------------------------------------------------------------------------

GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD+=("--project=$PROJECT")
GCLOUD+=(--worker=all ${EXTRA_SSH_FLAGS[@]+"${EXTRA_SSH_FLAGS[@]}"})

show() { # print a command, shell-quoted so it can be pasted
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

echo "tpu_pod.sh: TPU $TPU_NAME in zone $ZONE${PROJECT:+, project $PROJECT}, all workers"
STEPS=()
if [[ -n "$SETUP_CMD" ]]; then
  echo "tpu_pod.sh: setup on every worker: $SETUP_CMD"
  STEPS+=("$SETUP_CMD")
fi
echo "tpu_pod.sh: run on every worker: $RUN_CMD"
STEPS+=("$RUN_CMD")

# --- the compile check, on this machine -------------------------------------------------------

# What the run compiles is set by its config and mode; other arguments (workdir, ...) do not matter.
AOT_ARGS=()
AOT_MODE=pretrain
for arg in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
  case "$arg" in
    --mode=*) AOT_MODE="${arg#--mode=}" ;;
    --config=* | --config.*) AOT_ARGS+=("$arg") ;;
  esac
done
case "$AOT_MODE" in
  xnli_sweep) AOT_MODE=xnli ;; # the grid's runs share the fine-tuning programs
  pretrain | nmt | xnli) ;;
  *) AOT_CHECK=0 && echo "tpu_pod.sh: --mode=$AOT_MODE trains nothing: no compile check" ;;
esac
if [[ "$AOT_CHECK" != 0 ]]; then
  if [[ -z "$AOT_TOPOLOGY" ]]; then
    DESCRIBE=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "--zone=$ZONE")
    [[ -z "$PROJECT" ]] || DESCRIBE+=("--project=$PROJECT")
    DESCRIBE+=("--format=value(acceleratorType)")
    show "${DESCRIBE[@]}"
    if [[ "$DRY_RUN" == 1 ]]; then
      AOT_TOPOLOGY='<acceleratorType>'
    else
      AOT_TOPOLOGY=$("${DESCRIBE[@]}") || {
        echo "tpu_pod.sh: error: could not ask gcloud for the slice type; set AOT_TOPOLOGY" >&2
        exit 2
      }
    fi
  fi
  AOT_CMD=("$AOT_PYTHON" -m xlm_jax.aot "--topology=$AOT_TOPOLOGY" "--mode=$AOT_MODE")
  AOT_CMD+=(${AOT_ARGS[@]+"${AOT_ARGS[@]}"})
  echo "tpu_pod.sh: compile check for $AOT_TOPOLOGY on this machine:"
  show "${AOT_CMD[@]}"
fi

for step in "${STEPS[@]}"; do
  show "${GCLOUD[@]}" "--command=$step"
done
if [[ "$DRY_RUN" == 1 ]]; then
  echo "tpu_pod.sh: DRY_RUN=1: nothing was run"
  exit 0
fi
command -v gcloud >/dev/null 2>&1 || {
  echo "tpu_pod.sh: error: gcloud not found (install the Google Cloud CLI, or use DRY_RUN=1)" >&2
  exit 2
}

if [[ "$AOT_CHECK" != 0 ]]; then
  "${AOT_CMD[@]}" || {
    echo "tpu_pod.sh: the compile check failed (above): nothing was started on $TPU_NAME." \
      "Fix the config or mesh, or skip the check with AOT_CHECK=0." >&2
    exit 3
  }
fi
for step in "${STEPS[@]}"; do
  "${GCLOUD[@]}" "--command=$step" || {
    rc=$?
    echo "tpu_pod.sh: FAILED (gcloud exit $rc) running on the workers: $step" >&2
    exit "$rc"
  }
done
echo "tpu_pod.sh: done"
