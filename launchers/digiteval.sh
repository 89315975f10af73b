#!/usr/bin/env bash
# DigitEval end to end on CPU, nothing downloaded (docs/DIGITEVAL.md):
# DigitEval teacher (about 20 minutes on 2 idle cores) -> stage 0 -> stages (2 ranks) -> `d2m eval` of the
# teacher and of every stage's student -> RUN/table.md (one row each) and RUN/summary.json.
# METHOD picks what is distilled from the shared teacher, each at the same activated FFN width (1.5 D of 4 D)
# and the same distillation budget (25,600 samples):
#   moe     1S12E2A, Taylor-initialised; stage 1 (shared expert, k = 0) then stage 2 (routed experts, EP 2)
#   random  the same with a random neuron split instead of Taylor's
#   width   width pruning: the Taylor-top 1.5 D neurons of every FFN as one dense FFN (1.5S10E0A, k = 0),
#           distilled for both stages' budget in stage 1
# TEACHER (default runs/digiteval/teacher) is trained once and shared; RUN defaults to runs/digiteval/$METHOD.
# Re-running resumes (finished steps are skipped). Extra key=value arguments go to every stage;
# EVAL_ARGS to every `d2m eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${METHOD:-moe}
case "$METHOD" in
  moe) convert=(); stages=(1 2); stage1=(); eval1=(--top-k 0) ;;  # after stage 1 only the shared expert trained
  random) convert=(partition.strategy=random); stages=(1 2); stage1=(); eval1=(--top-k 0) ;;
  width) convert=(moe.spec=1.5S10E0A); stages=(1); stage1=(steps=400); eval1=() ;;
  *) echo "digiteval.sh: METHOD must be moe, random or width (got '$METHOD')" >&2; exit 2 ;;
esac
bash tools/setup.sh
source launchers/env.sh
TEACHER=${TEACHER:-runs/digiteval/teacher}
RUN=${RUN:-runs/digiteval/$METHOD}
D2M=.venv/bin/d2m
EVAL_ARGS=${EVAL_ARGS:-}
mkdir -p "$RUN"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "DigitEval teacher ($TEACHER)"
[ -f "$TEACHER/model_index.json" ] || \
  $D2M teacher --config configs/digiteval/teacher.yaml --out "$TEACHER" progress=false
stamp "stage 0 ($METHOD)"
[ -d "$RUN/stage0" ] || $D2M convert --config configs/digiteval/stage0.yaml teacher.path="$TEACHER" \
  output="$RUN/stage0" ${convert[@]+"${convert[@]}"}
for s in "${stages[@]}"; do  # each stage starts from the previous one's output in run_dir
  stamp "stage $s"
  extra=()
  [ "$s" = 1 ] && extra=(${stage1[@]+"${stage1[@]}"})
  [ -d "$RUN/stage$s/export" ] || NPROC=2 launchers/local.sh configs/digiteval/stage$s.yaml \
    run_dir="$RUN" teacher.path="$TEACHER" ${extra[@]+"${extra[@]}"} "$@"
done
stamp "d2m eval: the teacher, then the student after each stage"
mkdir -p "$RUN/eval"
# shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
{
  [ -f "$RUN/eval/teacher/eval.json" ] || $D2M eval --model "$TEACHER" --label teacher \
    --out "$RUN/eval/teacher" $EVAL_ARGS
  [ -f "$RUN/eval/stage0/eval.json" ] || $D2M eval --model "$RUN/stage0" --teacher "$TEACHER" \
    --label "$METHOD stage 0" --out "$RUN/eval/stage0" $EVAL_ARGS
  for s in "${stages[@]}"; do
    knobs=()
    [ "$s" = 1 ] && knobs=(${eval1[@]+"${eval1[@]}"})
    [ -f "$RUN/eval/stage$s/eval.json" ] || $D2M eval --model "$RUN/stage$s/export" --teacher "$TEACHER" \
      ${knobs[@]+"${knobs[@]}"} --label "$METHOD stage $s" --out "$RUN/eval/stage$s" $EVAL_ARGS
  done
} >/dev/null
head -2 "$RUN/eval/teacher/row.md" > "$RUN/table.md"
for e in teacher stage0 "${stages[@]/#/stage}"; do tail -1 "$RUN/eval/$e/row.md" >> "$RUN/table.md"; done
.venv/bin/python -m d2m_dist.distill.report "$RUN" > "$RUN/summary.json"
stamp "done: $RUN/table.md, $RUN/summary.json"
cat "$RUN/table.md"
