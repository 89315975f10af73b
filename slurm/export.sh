#!/usr/bin/env bash
# Export the final student: copy <run_dir>/stage3/export (or D2M_EXPORT_FROM) to <run_dir>/student
# (or D2M_EXPORT_TO) and check that it loads (d2m_dist.models.portable.load_student).
#   sbatch slurm/export.sh CONFIG [key=value ...]   (CONFIG and overrides give run_dir, e.g. stage3.yaml)
#SBATCH --job-name=d2m-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch slurm/export.sh CONFIG [key=value ...]" >&2; exit 2; }
source "${D2M_REPO:-$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.* Command=\([^ ]*\)\/slurm\/[^ ]*.*/\1/p')}/slurm/common.sh"
d2m_setup_env
cd "${SLURM_SUBMIT_DIR:-.}"
run_dir=$(python - "$@" <<'PY'
import sys
from omegaconf import OmegaConf
cfg = OmegaConf.load(sys.argv[1])
over = [a for a in sys.argv[2:] if a.split("=", 1)[0] == "run_dir"]
print(OmegaConf.merge(cfg, OmegaConf.from_dotlist(over)).get("run_dir") or "")
PY
)
src=${D2M_EXPORT_FROM:-$run_dir/stage3/export}
dst=${D2M_EXPORT_TO:-$run_dir/student}
[ -n "$run_dir" ] || [ -n "${D2M_EXPORT_FROM:-}" ] || { echo "slurm/export.sh: no run_dir in $1 or the overrides" >&2; exit 2; }
[ -f "$src/d2m_config.json" ] || { echo "slurm/export.sh: $src is not a portable student (no d2m_config.json)" >&2; exit 2; }
echo "slurm/common.sh: $(date +%T) export $src -> $dst"
rm -rf "$dst.tmp" && cp -r "$src" "$dst.tmp"
python -c 'import sys; from d2m_dist.models.portable import load_student; m = load_student(sys.argv[1]); print("loaded", type(m).__name__, sum(p.numel() for p in m.parameters()), "parameters")' "$dst.tmp"
rm -rf "$dst" && mv "$dst.tmp" "$dst"
echo "slurm/export.sh: student in $dst"
