#!/usr/bin/env bash
# Stage 2 distillation (d2m train) on every node of the job; resumable, requeued when preempted.
#   sbatch [-N NODES] [--gpus-per-node=G] slurm/stage2.sh CONFIG [key=value ...]
# CPU clusters: GPUS_PER_NODE=0 sbatch --gpus-per-node=0 ... (see slurm/common.sh for the environment)
#SBATCH --job-name=d2m-stage2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch slurm/stage2.sh CONFIG [key=value ...]" >&2; exit 2; }
source "${D2M_REPO:-$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.* Command=\([^ ]*\)\/slurm\/[^ ]*.*/\1/p')}/slurm/common.sh"
config=$1; shift
d2m_run_distributed train --config "$config" "$@"
