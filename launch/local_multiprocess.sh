#!/usr/bin/env bash
# Starts N trainer processes on this machine the way a cluster starts one per host: each gets
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, and joins the others through
# jax.distributed (gloo collectives on CPU). Waits for all; fails if any fails.
#
#   launch/local_multiprocess.sh 2 -- --config configs/lm.py:size=test --workdir runs/mp
#
# DEVICES_PER_PROCESS (default 4) simulated CPU devices per process; PORT (default a free one).
# Extra python arguments go after "--"; the module defaults to foundation.train (MODULE=...).
set -euo pipefail
if [[ $# -lt 2 || "$2" != "--" ]]; then
  echo "usage: $0 N -- <foundation.train arguments>" >&2
  exit 2
fi
n=$1
shift 2
module=${MODULE:-foundation.train}
devices=${DEVICES_PER_PROCESS:-4}
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$python" -m "$module" "$@" &
  pids+=($!)
done

# A scheduler's SIGTERM (or Ctrl-C) goes to every process: they agree on a step, save it and exit
# with 75 (foundation.train's "preempted" code), which this script passes on.
signalled=0
trap 'signalled=1; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

# A process that fails leaves the others blocked in a collective: stop them all.
status=0
for ((i = 0; i < n; i++)); do
  code=0
  wait -n || code=$?
  if [[ $code -eq 127 ]]; then
    break  # no process left
  elif [[ $signalled -eq 1 && $code -gt 128 ]]; then
    ((i--)) || true  # the trap interrupted the wait, not a process ending
    signalled=2
  elif [[ $code -eq 75 && $status -eq 0 ]]; then
    status=75  # preempted: the others stop at the same step by themselves
  elif [[ $code -ne 0 && $code -ne 75 ]]; then
    echo "local_multiprocess: a process failed (exit $code); stopping the others" >&2
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
