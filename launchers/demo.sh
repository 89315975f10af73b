#!/usr/bin/env bash
# The embedded default, end to end on CPU with nothing downloaded (README command 1):
# digits shards -> precompute -> dense teacher -> stage 0 (convert) -> stages 1, 2 (2 ranks, EP 2), 3
# -> final student -> teacher/student sample grid and JSON summary.
# RUN (default runs/digits) is the output folder. Re-running resumes: finished steps are skipped,
# an interrupted stage continues from its last checkpoint. Extra key=value arguments go to every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source launchers/env.sh
RUN=${RUN:-runs/digits}
D2M=.venv/bin/d2m
mkdir -p "$RUN"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }
shards="$RUN/shards/precomputed/train-{000000..000007}.tar"

stamp "shards from scikit-learn's digits"
[ -f "$RUN/shards/raw/train.manifest.json" ] || \
  $D2M shards make digits out_dir="$RUN/shards/raw" max_samples=225
stamp "precompute (2 ranks): pixels + offline MiniLM text embeddings"
[ -f "$RUN/shards/precomputed/train.manifest.json" ] || \
  NPROC=2 VERB=precompute launchers/local.sh configs/digits/precompute.yaml \
    "inputs=$RUN/shards/raw/train-{000000..000007}.tar" out_dir="$RUN/shards/precomputed"
stamp "dense teacher"
[ -f "$RUN/teacher/model_index.json" ] || $D2M teacher --config configs/digits/teacher.yaml --out "$RUN/teacher"
stamp "stage 0: Taylor-initialised MoE conversion"
[ -d "$RUN/stage0" ] || $D2M convert --config configs/digits/stage0.yaml teacher.path="$RUN/teacher" output="$RUN/stage0"
for s in 1 2 3; do  # each stage starts from the previous one's output in run_dir
  stamp "stage $s"
  [ -d "$RUN/stage$s/export" ] || NPROC=2 launchers/local.sh configs/digits/stage$s.yaml \
    run_dir="$RUN" teacher.path="$RUN/teacher" "data.urls=$shards" "$@"
done
stamp "export and evaluation"
rm -rf "$RUN/student" && cp -r "$RUN/stage3/export" "$RUN/student"
$D2M sample --teacher "$RUN/teacher" --student "$RUN/student" --out "$RUN/samples.png" --json "$RUN/eval.json"
.venv/bin/python -m d2m_dist.distill.report "$RUN" > "$RUN/summary.json"
stamp "done: $RUN/summary.json, $RUN/samples.png"
cat "$RUN/summary.json"
