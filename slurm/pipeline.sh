#!/usr/bin/env bash
# Submit the whole pipeline as a dependency chain: stage0 -> stage1 -> stage2 -> stage3 -> export
# (each with --dependency=afterok:<previous>; a failing job cancels everything after it).
#   slurm/pipeline.sh CONFIG_DIR [key=value ...] [sN:key=value ...]
# CONFIG_DIR holds stage0.yaml .. stage3.yaml (e.g. configs/digits). Plain key=value overrides go to
# stages 1-3 and export; `s0:`, `s1:`, `s2:`, `s3:`, `export:` prefixes send one to that job only and
# `all:` to every job (stage 0 included, e.g. all:teacher.path=...). With run_dir=R, stage 0 writes
# R/stage0 and each stage starts from the previous one's export (a stage's init follows from run_dir).
# D2M_SBATCH_ARGS: extra sbatch flags for every job (e.g. "--partition=gpu --gpus-per-node=8 -N 4").
# Prints one line per job: "<name> <job id>".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ $# -ge 1 ] || { echo "usage: slurm/pipeline.sh CONFIG_DIR [key=value ...]" >&2; exit 2; }
cfg=$1; shift
for s in 0 1 2 3; do [ -f "$cfg/stage$s.yaml" ] || { echo "slurm/pipeline.sh: $cfg/stage$s.yaml not found" >&2; exit 2; }; done

declare -a o0=() o1=() o2=() o3=() oe=()
run_dir=""
add() { case $1 in s0) o0+=("$2");; s1) o1+=("$2");; s2) o2+=("$2");; s3) o3+=("$2");; export) oe+=("$2");; esac; }
for a in "$@"; do
  case $a in
    s0:*|s1:*|s2:*|s3:*|export:*) add "${a%%:*}" "${a#*:}" ;;
    all:*) for j in s0 s1 s2 s3 export; do add $j "${a#all:}"; done ;;
    *=*) [[ $a == run_dir=* ]] && run_dir=${a#run_dir=}
         for j in s1 s2 s3 export; do add $j "$a"; done ;;
    *) echo "slurm/pipeline.sh: not a key=value override: $a" >&2; exit 2 ;;
  esac
done
if [ -n "$run_dir" ]; then
  has() { local k=$1; shift; for x in "$@"; do [[ $x == "$k="* ]] && return 0; done; return 1; }
  has output "${o0[@]+"${o0[@]}"}" || o0+=("output=$run_dir/stage0")
fi
export D2M_REPO=${D2M_REPO:-$(dirname "$here")}
read -r -a extra <<<"${D2M_SBATCH_ARGS:-}"
dep=()
submit() {  # name script args...
  local name=$1 id; shift
  id=$(sbatch --parsable --kill-on-invalid-dep=yes "${dep[@]+"${dep[@]}"}" "${extra[@]+"${extra[@]}"}" "$@")
  id=${id%%;*}
  echo "$name $id"
  dep=(--dependency=afterok:"$id")
}
submit stage0 "$here/stage0.sh" "$cfg/stage0.yaml" "${o0[@]+"${o0[@]}"}"
submit stage1 "$here/stage1.sh" "$cfg/stage1.yaml" "${o1[@]+"${o1[@]}"}"
submit stage2 "$here/stage2.sh" "$cfg/stage2.yaml" "${o2[@]+"${o2[@]}"}"
submit stage3 "$here/stage3.sh" "$cfg/stage3.yaml" "${o3[@]+"${o3[@]}"}"
submit export "$here/export.sh" "$cfg/stage3.yaml" "${oe[@]+"${oe[@]}"}"
