#!/usr/bin/env bash
# Stage 0 (d2m convert): Taylor importance, experts, routers; one process on one node.
#   sbatch slurm/stage0.sh CONFIG [key=value ...]
#SBATCH --job-name=d2m-stage0
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch slurm/stage0.sh CONFIG [key=value ...]" >&2; exit 2; }
source "${D2M_REPO:-$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.* Command=\([^ ]*\)\/slurm\/[^ ]*.*/\1/p')}/slurm/common.sh"
config=$1; shift
d2m_run_single convert --config "$config" "$@"
