#!/usr/bin/env bash
# Multi-process training on this machine: N JAX processes, each with its own CPU devices, joined
# through a coordinator on localhost. Exercises the multi-host code path (jax.distributed,
# per-process input shards, cross-process collectives over gloo, coordinated checkpoints)
# without a cluster.
#
#   launch/local.sh N [train args...]
#   launch/local.sh 2 --config configs/clip.py:tiny --workdir runs/local \
#       --config.data.source=synthetic --config.batch_size=16
#
# Environment:
#   DEVICES_PER_PROCESS  CPU devices per process (default 4)
#   COORDINATOR_PORT     coordinator port (default: a free port picked now)
#   PYTHON               interpreter (default: python)
#   FAIL_GRACE_S         after one process fails, how long the others may take to stop on
#                        their own (JAX's heartbeat timeout) before they are killed (default 300)
# Output lines are prefixed with "[process i]". Exit status: 0 when every process succeeded,
# else the first non-zero status. SIGTERM/SIGINT are forwarded to every process (the trainer
# then saves a checkpoint and exits).
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N [train args...]   (N: number of processes, >= 1)" >&2
  exit 2
fi
num_processes=$1
shift
devices=${DEVICES_PER_PROCESS:-4}
python=${PYTHON:-python}
grace=${FAIL_GRACE_S:-300}
port=${COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# Replace any device-count flag inherited from the caller (e.g. a test environment's).
base_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
export XLA_FLAGS="$base_flags --xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=cpu

pids=()
forward() {
  echo "local.sh: forwarding $1 to ${pids[*]}" >&2
  kill "-$1" "${pids[@]}" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT

echo "local.sh: $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port"
for ((i = 0; i < num_processes; i++)); do
  "$python" -m clip_jax.train "$@" \
    --config.distributed.initialize=True \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$num_processes" \
    --config.distributed.process_id="$i" \
    > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=($!)
  echo "local.sh: started process $i pid $!"
done

status=0
failed_at=""
remaining=$num_processes
declare -A done_pids=()
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -n "${done_pids[$pid]:-}" ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      rc=$?
      done_pids[$pid]=1
      remaining=$((remaining - 1))
      echo "local.sh: process $i (pid $pid) exited with status $rc"
      if ((rc != 0)); then
        ((status == 0)) && status=$rc
        [[ -z "$failed_at" ]] && failed_at=$SECONDS
      fi
    fi
  done
  if [[ -n "$failed_at" ]] && ((remaining > 0 && SECONDS - failed_at > grace)); then
    echo "local.sh: a process failed ${grace}s ago; killing the remaining ones" >&2
    for pid in "${pids[@]}"; do
      [[ -z "${done_pids[$pid]:-}" ]] && kill -KILL "$pid" 2>/dev/null
    done
  fi
  ((remaining > 0)) && sleep 0.5
done
wait  # the output prefixers
exit "$status"
