#!/usr/bin/env bash
# GPU smoke run: the library's CUDA paths end to end, and the FLUX-shaped timings for
# docs/BENCHMARKS.md (all in $OUT/bench.md: the MoE layer, the training step, whole-model
# inference). One script, meant for a lent GPU machine with a few minutes:
#   bash tools/gpu_assets.sh                 # here, once: .gpu/ (teacher, shards, caption cache)
#   bash tools/gpu_smoke.sh                  # there; wheels in .whl/ are installed first if present
# Writes its log and results under $OUT (default /tmp/gpu_smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_smoke}
ASSETS=${ASSETS:-.gpu}
RUN=${RUN:-/tmp/gpu_smoke_run}
mkdir -p "$OUT"
exec > >(tee "$OUT/smoke.log") 2>&1
stamp() { echo "=== $(date +%T) $*"; }
fail=0
check() { local name=$1; shift; stamp "$name"; if "$@"; then echo "--- ok: $name"; else echo "--- FAILED: $name"; fail=1; fi; }

WHEELS=${WHEELS:-.whl}  # Python 3.12 wheels of what the machine's image lacks (docs/BENCHMARKS.md, GPU runs)
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1 D2M_TEXT_CACHE=$ASSETS/text_cache
source launchers/env.sh
nvidia-smi -L
$PYTHON -c "import torch, deepspeed, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| diffusers', diffusers.__version__)"

check "CUDA unit checks" $PYTHON -m pytest -q -p no:cacheprovider tests/gpu

rm -rf "$RUN"
d2m() { $PYTHON -m d2m_dist.cli "$@"; }
urls="$ASSETS/shards/train-{000000..000001}.tar"
common=(run_dir="$RUN" teacher.path="$ASSETS/teacher" data.urls="$urls" parallel.ep_size=1 log.wandb=false
        log.progress=false log.every=20)
check "stage 0 (Taylor calibration on CUDA)" d2m convert --config configs/digits/stage0.yaml \
  teacher.path="$ASSETS/teacher" output="$RUN/stage0" device="${DEVICE:-cuda}"
check "stage 1 (ZeRO-3, bf16 autocast, NCCL)" env NPROC=1 launchers/local.sh configs/digits/stage1.yaml \
  "${common[@]}" init="$RUN/stage0" steps=60
check "stage 2 (experts, ZeRO-2, teacher ZeRO-3 offloaded to pinned CPU memory, EMA)" env NPROC=1 \
  launchers/local.sh configs/digits/stage2.yaml "${common[@]}" init="$RUN/stage1/export" steps=100 \
  teacher.placement=offload ema.enabled=true ema.decay=0.9
check "stage 3 (MoB routers)" env NPROC=1 launchers/local.sh configs/digits/stage3.yaml "${common[@]}" \
  init="$RUN/stage2/export" steps=40
for s in 1 2 3; do
  f="$RUN/stage$s/summary.json"
  [ -f "$f" ] && $PYTHON - "$f" "$RUN/stage$s/metrics.jsonl" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m = [json.loads(l) for l in open(sys.argv[2]) if '"time/' in l][-1]
times = " ".join(f"{k[5:]}={v * 1e3:.1f}ms" for k, v in m.items() if k.startswith("time/"))
print(f"stage {s['stage']}: loss {s['first_loss']:.4g} -> {s['last_loss']:.4g}, skipped {s['skipped_steps']}, "
      f"max/mean load {max(s['max_over_mean_expert_load'].values(), default=float('nan')):.3g}, "
      f"{m['images_per_s']:.0f} img/s, peak {m.get('memory/peak_gb', 0):.2f} GiB | {times}")
PY
done
cp "$RUN"/stage3/samples/*.png "$OUT/" 2>/dev/null || true
# the planner against CUDA's allocator: stage 1's planned bytes per GPU beside its measured peak
check "planner vs torch.cuda.max_memory_allocated (stage 1)" $PYTHON tools/plan_vs_peak.py configs/digits/stage1.yaml \
  "$ASSETS/teacher" "$RUN/stage1/metrics.jsonl" "$OUT/plan_stage1.json"
check "generate: the stage-3 student beside its teacher, bf16 on CUDA" d2m generate --student "$RUN/stage3/export" \
  --pipeline "$ASSETS/teacher" --prompt "a handwritten digit seven" --teacher-too --out "$OUT/generate"

if [ "${BENCH:-1}" = 1 ]; then  # BENCH=0 skips the 12B-parameter timing (a dry run on a CPU machine)
  # every figure goes to one file, $OUT/bench.md (and the MoE layer's rows also to bench_moe.json)
  check "MoE layer at FLUX width" d2m bench moe dims=3072 json="$OUT/bench_moe.json" --out "$OUT/bench.md"
  # whole-model inference at full depth where FLUX.1-dev's bf16 copy (24 GB) fits several times over
  gib=$($PYTHON -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30 if torch.cuda.is_available() else 0)")
  STEP_DEPTH=${STEP_DEPTH:-$([ "${gib:-0}" -ge 60 ] && echo full || echo reduced)}
  check "FLUX.1-dev step and inference timing, batch 1" d2m bench step batch=1 parts=train,inference \
    depth="$STEP_DEPTH" --out "$OUT/bench.md"
  for b in ${STEP_BATCHES:-}; do  # e.g. STEP_BATCHES=2: the training step at larger batches (about a minute each)
    check "FLUX.1-dev step timing, batch $b" d2m bench step batch="$b" parts=train --out "$OUT/bench.md"
  done
fi
stamp "done, fail=$fail"
exit $fail
