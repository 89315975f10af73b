#!/usr/bin/env bash
# The embedded default, end to end on CPU with nothing downloaded (README command 1):
# digits shards -> precompute -> dense teacher -> stage 0 (convert) -> stages 1, 2 (2 ranks, EP 2), 3
# -> final student -> teacher/student sample grid and JSON summary in runs/digits/.
# Re-running resumes: finished steps are skipped, interrupted stages continue from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source launchers/env.sh
RUN=runs/digits
D2M=.venv/bin/d2m
mkdir -p "$RUN"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "shards from scikit-learn's digits"
[ -f "$RUN/shards/raw/train.manifest.json" ] || \
  $D2M shards make digits out_dir="$RUN/shards/raw" max_samples=225
stamp "precompute (2 ranks): pixels + offline MiniLM text embeddings"
[ -f "$RUN/shards/precomputed/train.manifest.json" ] || \
  NPROC=2 VERB=precompute launchers/local.sh configs/digits/precompute.yaml
stamp "dense teacher"
[ -f "$RUN/teacher/model_index.json" ] || $D2M teacher --config configs/digits/teacher.yaml --out "$RUN/teacher"
stamp "stage 0: Taylor-initialised MoE conversion"
[ -d "$RUN/stage0" ] || $D2M convert --config configs/digits/stage0.yaml
for s in 1 2 3; do
  stamp "stage $s"
  [ -d "$RUN/stage$s/export" ] || NPROC=2 launchers/local.sh configs/digits/stage$s.yaml
done
stamp "export and evaluation"
rm -rf "$RUN/student" && cp -r "$RUN/stage3/export" "$RUN/student"
$D2M sample --teacher "$RUN/teacher" --student "$RUN/student" --out "$RUN/samples.png" --json "$RUN/eval.json"
.venv/bin/python -m d2m_dist.distill.report "$RUN" > "$RUN/summary.json"
stamp "done: $RUN/summary.json, $RUN/samples.png"
cat "$RUN/summary.json"
