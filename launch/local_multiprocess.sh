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

# A process that fails leaves the others blocked in a collective: stop them all.
status=0
for ((i = 0; i < n; i++)); do
  if ! wait -n; then
    echo "local_multiprocess: a process failed; stopping the others" >&2
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
