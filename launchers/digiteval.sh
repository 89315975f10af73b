#!/usr/bin/env bash
# DigitEval end to end on CPU, nothing downloaded (issue 16; docs/DIGITEVAL.md):
# DigitEval teacher (about 20 minutes on 2 cores) -> stage 0 (1S12E2A, Taylor) -> stages 1, 2 (2 ranks, EP 2)
# -> `d2m eval` of the teacher and of every stage's student -> RUN/table.md (one row each) and summary.json.
# RUN (default runs/digiteval) is the output folder; re-running resumes (finished steps are skipped).
# Extra key=value arguments go to every stage. EVAL_ARGS are passed to every `d2m eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source launchers/env.sh
RUN=${RUN:-runs/digiteval}
D2M=.venv/bin/d2m
EVAL_ARGS=${EVAL_ARGS:-}
mkdir -p "$RUN"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "DigitEval teacher"
[ -f "$RUN/teacher/model_index.json" ] || \
  $D2M teacher --config configs/digiteval/teacher.yaml --out "$RUN/teacher" progress=false
stamp "stage 0: Taylor-initialised 1S12E2A conversion"
[ -d "$RUN/stage0" ] || \
  $D2M convert --config configs/digiteval/stage0.yaml teacher.path="$RUN/teacher" output="$RUN/stage0"
for s in 1 2; do  # each stage starts from the previous one's output in run_dir
  stamp "stage $s"
  [ -d "$RUN/stage$s/export" ] || NPROC=2 launchers/local.sh configs/digiteval/stage$s.yaml \
    run_dir="$RUN" teacher.path="$RUN/teacher" "$@"
done
stamp "d2m eval: teacher, stage 0, stage 1 (k = 0), stage 2"
# shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
{
  [ -f "$RUN/eval/teacher/eval.json" ] || $D2M eval --model "$RUN/teacher" --label teacher \
    --out "$RUN/eval/teacher" $EVAL_ARGS
  [ -f "$RUN/eval/stage0/eval.json" ] || $D2M eval --model "$RUN/stage0" --teacher "$RUN/teacher" \
    --label "stage 0 (Taylor, k=2)" --out "$RUN/eval/stage0" $EVAL_ARGS
  [ -f "$RUN/eval/stage1/eval.json" ] || $D2M eval --model "$RUN/stage1/export" --teacher "$RUN/teacher" \
    --top-k 0 --label "stage 1 (shared expert, k=0)" --out "$RUN/eval/stage1" $EVAL_ARGS
  [ -f "$RUN/eval/stage2/eval.json" ] || $D2M eval --model "$RUN/stage2/export" --teacher "$RUN/teacher" \
    --label "stage 2 (MoE 1S12E2A)" --out "$RUN/eval/stage2" $EVAL_ARGS
} >/dev/null
head -2 "$RUN/eval/teacher/row.md" > "$RUN/table.md"
for e in teacher stage0 stage1 stage2; do tail -1 "$RUN/eval/$e/row.md" >> "$RUN/table.md"; done
.venv/bin/python -m d2m_dist.distill.report "$RUN" > "$RUN/summary.json"
stamp "done: $RUN/table.md, $RUN/summary.json"
cat "$RUN/table.md"
