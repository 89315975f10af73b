# Shared logic of the sbatch scripts in slurm/ (sourced by each; also run per task as
# `bash slurm/common.sh --task VERB ARGS...` by the srun it starts).
#
# In a batch script:   source "$D2M_REPO/slurm/common.sh"; d2m_run_distributed train --config C k=v...
#                      (or d2m_run_single convert ... for a one-process step)
# Environment:
#   GPUS_PER_NODE   processes per node (default: $SLURM_GPUS_PER_NODE, else 1 = one CPU process per node)
#   D2M_LAUNCH      torchrun (default: one torchrun per node, c10d rendezvous on the first node)
#                   | srun (one task per GPU: RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/LOCALID/NTASKS,
#                     MASTER_ADDR/PORT = the first node's NodeAddr and the job's port)
#   D2M_MAX_REQUEUE requeues allowed after a preemption (default 3; compared with SLURM_RESTART_COUNT)
#   D2M_STATUS_DIR  shared folder for the trainer's status file (default $SLURM_SUBMIT_DIR/.cache/d2m_status)
#   D2M_VENV        python environment to activate (default $D2M_REPO/.venv)
# Exit codes (the trainer's): 0 done, 3 preempted (the job is requeued unless the limit is reached),
# 4 diverged, 2 bad input; torchrun's own 1 when the trainer wrote nothing.

# -- the repository: sbatch runs a copy of the script from its spool, so $0 says nothing ------------
d2m_find_repo() {
  if [ -n "${D2M_REPO:-}" ]; then echo "$D2M_REPO"; return; fi
  local cmd
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/common.sh" ]; then (cd "$(dirname "$cmd")/.." && pwd); return; fi
  fi
  if [ -f "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" ]; then (cd "${SLURM_SUBMIT_DIR:-.}" && pwd); return; fi
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

d2m_setup_env() {
  export D2M_REPO=${D2M_REPO:-$(d2m_find_repo)}
  local venv=${D2M_VENV:-$D2M_REPO/.venv}
  # shellcheck disable=SC1091
  [ -f "$venv/bin/activate" ] && source "$venv/bin/activate"
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$D2M_REPO/.cache/torch_extensions}
  # shellcheck disable=SC1091
  source "$D2M_REPO/launchers/env.sh"
  export PYTHONUNBUFFERED=1
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  GPUS_PER_NODE=${GPUS_PER_NODE##*:}             # "a100:4" -> 4
  [ "$GPUS_PER_NODE" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=0
  export GPUS_PER_NODE
  export D2M_NPROC_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
  export D2M_LAUNCH=${D2M_LAUNCH:-torchrun}
}

# -- rendezvous: the first node of the job, by its NodeAddr (node names need not resolve) ----------
d2m_rdzv_addr() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
  addr=$(scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -1)
  if [ -z "$addr" ]; then
    echo "slurm/common.sh: no NodeAddr for node $first" >&2; return 1
  fi
  if [ "${SLURM_NNODES:-1}" -gt 1 ] && [[ "$addr" == localhost || "$addr" == 127.* ]] ; then
    # a loopback address is only right when every node is this host (the local test cluster)
    local others
    others=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | while read -r n; do
      scontrol show node "$n" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p'; done | sort -u | wc -l)
    [ "$others" = 1 ] || { echo "slurm/common.sh: $first has loopback NodeAddr $addr on a multi-host job" >&2; return 1; }
  fi
  echo "$addr"
}

# deterministic per job (and per requeue, so a lingering socket of the previous attempt cannot collide)
d2m_rdzv_port() { echo $(( 20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0}) % 30000 )); }

# -- one srun task (one per node with torchrun, one per GPU with D2M_LAUNCH=srun) ----------------------
d2m_task() {
  d2m_setup_env
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if [ "$D2M_LAUNCH" = srun ]; then
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    export LOCAL_WORLD_SIZE=$D2M_NPROC_PER_NODE LOCAL_SIZE=$D2M_NPROC_PER_NODE
    exec python -m d2m_dist.cli "$@"
  fi
  export LOCAL_SIZE=$D2M_NPROC_PER_NODE   # DeepSpeed's CPU shared-memory op
  local is_host=0
  [ "${SLURM_NODEID:-0}" = 0 ] && is_host=1
  exec python -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$D2M_NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_conf="is_host=$is_host" --max_restarts=0 \
    -m d2m_dist.cli "$@"
}

# -- in the batch script ------------------------------------------------------------------------------
_d2m_forward() {  # USR1 (Slurm's warning, --signal=B:USR1@T) or TERM: checkpoint and stop
  echo "slurm/common.sh: $(date +%T) got $1: forwarding TERM to the job steps"
  # not `kill -TERM <srun pid>`: srun turns a TERM into a step cancel (tasks KILLed, exit 137, seen on
  # Slurm 22.05). `scancel --signal=TERM JOBID` signals every step's tasks (not the batch shell) and
  # cancels nothing: the trainer checkpoints and exits 3. Fallback: the srun pid.
  if [ -n "${SLURM_JOB_ID:-}" ] && scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null; then return 0; fi
  [ -n "${_d2m_step_pid:-}" ] && kill -TERM "$_d2m_step_pid" 2>/dev/null
  return 0
}

# d2m_launch CMD...: run CMD in the background, forward signals to it, wait for its real end; sets _d2m_rc
d2m_launch() {
  "$@" &
  _d2m_step_pid=$!
  _d2m_rc=0
  while :; do
    wait "$_d2m_step_pid" && { _d2m_rc=0; break; } || _d2m_rc=$?
    kill -0 "$_d2m_step_pid" 2>/dev/null || break   # a trapped signal interrupts wait: wait again
  done
}

# d2m_finish CODE: requeue on 3 (preempted) unless D2M_MAX_REQUEUE is reached; exit with CODE
d2m_finish() {
  local code=$1 restarts=${SLURM_RESTART_COUNT:-0} max=${D2M_MAX_REQUEUE:-3}
  echo "slurm/common.sh: $(date +%T) step ended with code $code (restart $restarts)"
  if [ "$code" = 3 ]; then
    if [ "$restarts" -lt "$max" ]; then
      echo "slurm/common.sh: preempted: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
      scontrol requeue "$SLURM_JOB_ID" && exit 0
      echo "slurm/common.sh: scontrol requeue failed" >&2
    else
      echo "slurm/common.sh: preempted but D2M_MAX_REQUEUE=$max requeues reached: giving up" >&2
    fi
  fi
  exit "$code"
}

d2m_trap() { trap '_d2m_forward USR1' USR1; trap '_d2m_forward TERM' TERM; }

# d2m_run_distributed VERB ARGS...: the verb on every node of the job (train)
d2m_run_distributed() {
  d2m_setup_env
  cd "${SLURM_SUBMIT_DIR:-.}"
  export MASTER_ADDR MASTER_PORT
  MASTER_ADDR=$(d2m_rdzv_addr) || exit 1
  MASTER_PORT=$(d2m_rdzv_port)
  local sdir=${D2M_STATUS_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/.cache/d2m_status}
  mkdir -p "$sdir"
  export D2M_STATUS_FILE=$sdir/$SLURM_JOB_ID.status
  rm -f "$D2M_STATUS_FILE"   # a previous attempt's code must not be read as this one's
  local ntasks=1
  [ "$D2M_LAUNCH" = srun ] && ntasks=$D2M_NPROC_PER_NODE
  echo "slurm/common.sh: $(date +%T) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]," \
       "$D2M_LAUNCH x $D2M_NPROC_PER_NODE per node, rendezvous $MASTER_ADDR:$MASTER_PORT: d2m $*"
  d2m_trap
  # --ntasks explicitly: the batch environment keeps SLURM_NTASKS from submission, which is stale when a
  # requeued job comes back on another node count (srun: "More processors requested than permitted")
  d2m_launch srun --ntasks=$(( ntasks * SLURM_NNODES )) --ntasks-per-node="$ntasks" --nodes="$SLURM_NNODES" \
    --kill-on-bad-exit=0 \
    bash "$D2M_REPO/slurm/common.sh" --task "$@"
  local code
  code=$(cat "$D2M_STATUS_FILE" 2>/dev/null || true)
  d2m_finish "${code:-$_d2m_rc}"
}

# d2m_run_single VERB ARGS...: one process on the first node (convert, export checks)
d2m_run_single() {
  d2m_setup_env
  cd "${SLURM_SUBMIT_DIR:-.}"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_ON_NODE:-1}}
  echo "slurm/common.sh: $(date +%T) job $SLURM_JOB_ID: d2m $*"
  d2m_trap
  d2m_launch srun --ntasks=1 --nodes=1 python -m d2m_dist.cli "$@"
  d2m_finish "$_d2m_rc"
}

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = --task ]; then
  shift
  d2m_task "$@"
fi
