#!/usr/bin/env bash
# Run `d2m train` on this machine with torchrun.
#   launchers/local.sh CONFIG [key=value ...]
# NPROC (default: GPUs on this node, or 2 on a CPU machine) sets the process count;
# VERB (default train) picks another d2m verb that runs under torchrun (convert, precompute).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
[ $# -ge 1 ] || { echo "usage: launchers/local.sh CONFIG [key=value ...]" >&2; exit 2; }
config=$1; shift
[ -f "$config" ] || { echo "launchers/local.sh: config file not found: $config" >&2; exit 2; }
cd "$repo"
source launchers/env.sh
PY=${PYTHON:-$repo/.venv/bin/python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# CPU ranks share the cores; one thread each avoids oversubscription
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
export LOCAL_SIZE=$NPROC   # DeepSpeed's CPU shared-memory op needs it under torchrun
port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# torchrun turns any worker's non-zero exit into 1; the trainer writes its own code here
# (0 done, 3 stopped by a signal and resumable, 4 diverged) and we exit with it
export D2M_STATUS_FILE=$(mktemp)
trap 'rm -f "$D2M_STATUS_FILE"' EXIT
"$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" --master_port "$port" \
  -m d2m_dist.cli "${VERB:-train}" --config "$config" "$@" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
# torchrun does not handle USR1 (it would die of it): the trainer treats TERM the same
trap 'kill -TERM $pid 2>/dev/null' USR1
rc=0
wait $pid || rc=$?
if [ $rc -ge 128 ]; then wait $pid || rc=$?; fi  # a trapped signal interrupted wait: wait for the real end
code=$(cat "$D2M_STATUS_FILE" 2>/dev/null || true)
exit "${code:-$rc}"
