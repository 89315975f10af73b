#!/usr/bin/env bash
# Prepare what tools/gpu_smoke.sh needs and a GPU machine may lack (it has no network and no
# encoder package): a digits teacher, two precomputed shards, the digits caption encodings.
#   bash tools/gpu_assets.sh [RUN (default runs/digits, made by launchers/demo.sh)] [DEST (default .gpu)]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/digits}
DEST=${2:-.gpu}
for p in "$RUN/teacher" "$RUN/shards/precomputed"; do
  [ -e "$p" ] || { echo "tools/gpu_assets.sh: $p not found (run launchers/demo.sh first)" >&2; exit 2; }
done
rm -rf "$DEST" && mkdir -p "$DEST/shards"
cp -r "$RUN/teacher" "$DEST/teacher"
cp "$RUN"/shards/precomputed/train-00000[01].tar "$DEST/shards/"
D2M_TEXT_CACHE="$DEST/text_cache" .venv/bin/python - "$DEST/teacher" <<'PY'
import sys
from d2m_dist.convert.digits_calibration import teacher_card
from d2m_dist.data.text_encoder import empty_caption_encoding, encode_captions
from d2m_dist.distill.pretrain_teacher import digit_captions

n = teacher_card(sys.argv[1]).max_tokens
encode_captions(digit_captions(), n)
empty_caption_encoding(n)
PY
du -sh "$DEST"
