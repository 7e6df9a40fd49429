#!/usr/bin/env bash
# Local multi-process run on one machine, on CPU: what the multi-host tests use, and a way to try
# a multi-host setup (jax.distributed, cross-process collectives, sharded checkpoints) on a laptop.
#
#   launch/local.sh NUM_PROCESSES [--devices-per-process N] [--port P] [--timeout S] -- MAIN_ARGS...
#
# e.g. two processes with two CPU devices each (a 4-device mesh):
#
#   launch/local.sh 2 --devices-per-process 2 -- \
#       --config=configs/demo.py --workdir=/tmp/xlm_local --config.max_steps=20
#
# Process i runs, in the background, with JAX_PLATFORMS=cpu and
# JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=NUM_PROCESSES, JAX_PROCESS_ID=i
# (xlm_jax/main.py reads these as the defaults of its --coordinator_address, --num_processes and
# --process_id flags):
#
#   ${PYTHON:-python} -m xlm_jax.main --multihost --cpu_collectives=gloo --cpu_devices=N MAIN_ARGS...
#
# Output of process i goes to ${LOG_DIR:-.}/process_<i>.log; process 0's log is also streamed to
# the console. If a process fails, the others are killed and the script exits non-zero, naming the
# failed process and printing the tail of its log. Everything binds to 127.0.0.1 only.
#
# Options:
#   --devices-per-process N  CPU devices per process (--cpu_devices); default 1
#   --port P                 coordinator port; default: a free port chosen by the OS
#   --timeout S              kill all processes after S seconds (exit 124); default 0 = no limit
# Environment:
#   PYTHON   interpreter (default: python)     LOG_DIR   where process_<i>.log go (default: .)
#   TAIL_LINES  lines of a failed process's log to print (default: 40)
#
# Exit status: 0 if every process succeeded; 2 on a usage error; 124 on timeout; otherwise the
# exit status of the first process that failed (130/143 if interrupted).

set -euo pipefail

PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-.}"
TAIL_LINES="${TAIL_LINES:-40}"
GRACE_SECONDS=10 # after SIGTERM, how long processes get before SIGKILL

usage_text() {
  cat <<'EOF'
usage: launch/local.sh NUM_PROCESSES [--devices-per-process N] [--port P] [--timeout S] -- MAIN_ARGS...

Starts NUM_PROCESSES local CPU processes of `python -m xlm_jax.main --multihost ...`, e.g.
  launch/local.sh 2 --devices-per-process 2 -- --config=configs/demo.py --workdir=/tmp/xlm_local
Env: PYTHON (default python), LOG_DIR (default .; logs are LOG_DIR/process_<i>.log).
EOF
}

usage() { # usage [EXIT_STATUS]: help on stdout for --help, on stderr (exit 2) for errors
  local rc="${1:-2}"
  if ((rc == 0)); then usage_text; else usage_text >&2; fi
  exit "$rc"
}

die_usage() {
  echo "local.sh: error: $*" >&2
  usage
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# --- arguments ----------------------------------------------------------------------------------

[[ $# -ge 1 ]] || die_usage "missing NUM_PROCESSES"
case "$1" in -h | --help) usage 0 ;; esac
NUM_PROCESSES="$1"
shift
{ is_uint "$NUM_PROCESSES" && ((10#$NUM_PROCESSES >= 1)); } ||
  die_usage "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'"
NUM_PROCESSES=$((10#$NUM_PROCESSES))

DEVICES_PER_PROCESS=1
PORT=""
TIMEOUT=0
SEEN_SEPARATOR=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --)
      SEEN_SEPARATOR=1
      shift
      break
      ;;
    --devices-per-process | --port | --timeout)
      [[ $# -ge 2 ]] || die_usage "$1 needs a value"
      case "$1" in
        --devices-per-process) DEVICES_PER_PROCESS="$2" ;;
        --port) PORT="$2" ;;
        --timeout) TIMEOUT="$2" ;;
      esac
      shift 2
      ;;
    --devices-per-process=*) DEVICES_PER_PROCESS="${1#*=}" && shift ;;
    --port=*) PORT="${1#*=}" && shift ;;
    --timeout=*) TIMEOUT="${1#*=}" && shift ;;
    -h | --help) usage 0 ;;
    *) die_usage "unknown option '$1' (arguments for xlm_jax.main go after '--')" ;;
  esac
done
((SEEN_SEPARATOR)) || die_usage "missing '--' before the arguments of xlm_jax.main"
MAIN_ARGS=("$@")

{ is_uint "$DEVICES_PER_PROCESS" && ((10#$DEVICES_PER_PROCESS >= 1)); } ||
  die_usage "--devices-per-process must be a positive integer, got '$DEVICES_PER_PROCESS'"
DEVICES_PER_PROCESS=$((10#$DEVICES_PER_PROCESS))
is_uint "$TIMEOUT" || die_usage "--timeout must be a number of seconds (0 = none), got '$TIMEOUT'"
TIMEOUT=$((10#$TIMEOUT))

if [[ -z "$PORT" ]]; then
  # Let the OS pick a free loopback port. (Another program could take it before process 0 binds
  # it; pass --port to choose one yourself.)
  PORT="$("$PYTHON" -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')" || {
    echo "local.sh: error: could not pick a free port with '$PYTHON'; pass --port" >&2
    exit 2
  }
fi
{ is_uint "$PORT" && ((10#$PORT >= 1 && 10#$PORT <= 65535)); } ||
  die_usage "--port must be in 1..65535, got '$PORT'"
PORT=$((10#$PORT))
COORDINATOR="127.0.0.1:$PORT" # loopback only: nothing is reachable from other machines

mkdir -p "$LOG_DIR"

# --- process management -------------------------------------------------------------------------

PIDS=()     # PIDS[i]: pid of process i
RUNNING=()  # RUNNING[i]: 1 while process i has not been reaped
STATUS=()   # STATUS[i]: exit status of process i once reaped
TAIL_PID="" # the `tail -f` that streams process 0's log to the console

# A process and all its descendants (children first found, then theirs), if pgrep is available.
with_descendants() { # with_descendants PID
  local child
  echo "$1"
  command -v pgrep >/dev/null 2>&1 || return 0
  for child in $(pgrep -P "$1" 2>/dev/null || true); do
    with_descendants "$child"
  done
}

# Sends SIGTERM to every process still running and to its descendants (listed before any is
# signalled, as orphans are re-parented), waits up to GRACE_SECONDS, then SIGKILLs the rest.
kill_all() {
  local i pid deadline alive targets=()
  for i in "${!PIDS[@]}"; do
    if [[ "${RUNNING[$i]}" == 1 ]]; then
      # shellcheck disable=SC2207  # pids are plain numbers
      targets+=($(with_descendants "${PIDS[$i]}"))
    fi
  done
  ((${#targets[@]})) || return 0
  kill -TERM "${targets[@]}" 2>/dev/null || true
  deadline=$((SECONDS + GRACE_SECONDS))
  while ((SECONDS < deadline)); do
    alive=0
    for pid in "${targets[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then
        alive=1
        break
      fi
    done
    ((alive)) || return 0
    sleep 0.2
  done
  for pid in "${targets[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}

stop_tail() {
  if [[ -n "$TAIL_PID" ]]; then
    kill "$TAIL_PID" 2>/dev/null || true
    wait "$TAIL_PID" 2>/dev/null || true
    TAIL_PID=""
  fi
}

# On any exit (normal, error, signal), never leave a process behind.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if ((${#PIDS[@]})); then
    kill_all
  fi
  stop_tail
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "local.sh: interrupted: stopping all processes" >&2; exit 130' INT
trap 'echo "local.sh: terminated: stopping all processes" >&2; exit 143' TERM HUP

print_tail() { # print_tail i
  local log="$LOG_DIR/process_$1.log"
  echo "----- last $TAIL_LINES lines of $log -----" >&2
  tail -n "$TAIL_LINES" "$log" >&2 2>/dev/null || echo "(no log)" >&2
  echo "----- end of $log -----" >&2
}

# --- start --------------------------------------------------------------------------------------

TIMEOUT_NOTE=""
((TIMEOUT == 0)) || TIMEOUT_NOTE=", timeout ${TIMEOUT}s"
echo "local.sh: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator" \
  "$COORDINATOR, logs in $LOG_DIR/process_<i>.log$TIMEOUT_NOTE"
CMD=("$PYTHON" -m xlm_jax.main --multihost --cpu_collectives=gloo
  "--cpu_devices=$DEVICES_PER_PROCESS" "${MAIN_ARGS[@]}")
for ((i = 0; i < NUM_PROCESSES; i++)); do
  ENV=(JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=$COORDINATOR"
    "JAX_NUM_PROCESSES=$NUM_PROCESSES" "JAX_PROCESS_ID=$i")
  # The exact command, shell-quoted so it can be pasted to run one process by hand.
  printf '+ '
  printf '%q ' "${ENV[@]}" "${CMD[@]}"
  printf '> %q 2>&1 &\n' "$LOG_DIR/process_$i.log"
done

for ((i = 0; i < NUM_PROCESSES; i++)); do
  env JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=$COORDINATOR" \
    "JAX_NUM_PROCESSES=$NUM_PROCESSES" "JAX_PROCESS_ID=$i" \
    "${CMD[@]}" </dev/null >"$LOG_DIR/process_$i.log" 2>&1 &
  PIDS[i]=$!
  RUNNING[i]=1
done

# Stream process 0's log live. GNU tail's --pid makes it exit by itself, after printing the last
# lines, once process 0 is gone; elsewhere the log is printed once at the end instead.
STREAMED=0
if tail --version >/dev/null 2>&1; then
  tail -n +1 -F --pid="${PIDS[0]}" "$LOG_DIR/process_0.log" 2>/dev/null &
  TAIL_PID=$!
  STREAMED=1
fi

# --- wait ---------------------------------------------------------------------------------------

# Poll rather than `wait -n`, so a failure or the timeout is noticed whichever process it is.
REMAINING=$NUM_PROCESSES
FAILED="" # the first process that exited non-zero
TIMED_OUT=0
while ((REMAINING > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ "${RUNNING[$i]}" == 1 ]] || continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    if wait "${PIDS[$i]}"; then STATUS[i]=0; else STATUS[i]=$?; fi
    RUNNING[i]=0
    REMAINING=$((REMAINING - 1))
    if [[ "${STATUS[$i]}" != 0 && -z "$FAILED" ]]; then
      FAILED=$i
    fi
  done
  if [[ -n "$FAILED" ]]; then
    ((REMAINING == 0)) || echo "local.sh: process $FAILED failed (exit ${STATUS[$FAILED]}):" \
      "stopping the other processes" >&2
    break
  fi
  if ((TIMEOUT > 0 && SECONDS >= TIMEOUT)); then
    TIMED_OUT=1
    echo "local.sh: timeout after ${TIMEOUT}s: stopping all processes" >&2
    break
  fi
  ((REMAINING == 0)) || sleep 0.5
done

# Stop whatever still runs and collect its status (killed processes report 143 or 137).
kill_all
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if [[ "${RUNNING[$i]}" == 1 ]]; then
    if wait "${PIDS[$i]}" 2>/dev/null; then STATUS[i]=0; else STATUS[i]=$?; fi
    RUNNING[i]=0
  fi
done
PIDS=()
if ((STREAMED)); then
  # Process 0 has exited, so tail --pid ends on its own after flushing; give it a moment.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 "$TAIL_PID" 2>/dev/null || break
    sleep 0.2
  done
  stop_tail
else
  echo "----- $LOG_DIR/process_0.log -----"
  cat "$LOG_DIR/process_0.log" 2>/dev/null || true
  echo "----- end of $LOG_DIR/process_0.log -----"
fi

# --- report -------------------------------------------------------------------------------------

SUMMARY=""
for ((i = 0; i < NUM_PROCESSES; i++)); do
  SUMMARY+=" $i:${STATUS[$i]}"
done
if ((TIMED_OUT)); then
  echo "local.sh: FAILED: timeout after ${TIMEOUT}s (exit status by process:$SUMMARY)" >&2
  for ((i = 0; i < NUM_PROCESSES; i++)); do print_tail "$i"; done
  exit 124
fi
if [[ -n "$FAILED" ]]; then
  echo "local.sh: FAILED: process $FAILED exited with status ${STATUS[$FAILED]}" \
    "(exit status by process:$SUMMARY; the others were stopped after it failed)" >&2
  print_tail "$FAILED"
  exit "${STATUS[$FAILED]}"
fi
echo "local.sh: all $NUM_PROCESSES processes succeeded; logs in $LOG_DIR/process_<i>.log"
