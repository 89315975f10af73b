#!/usr/bin/env bash
# Prepare what tools/gpu_smoke.sh needs and a GPU machine may lack (it has no network and no
# encoder package): a digits teacher, two precomputed shards, the digits caption encodings, and
# (WHEELS=1, into .whl/) Python 3.12 wheels of the dependencies its image does not hold.
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
from d2m_dist.digits.card import teacher_card
from d2m_dist.digits.text_encoder import empty_caption_encoding, encode_captions
from d2m_dist.digits.data import digit_captions

n = teacher_card(sys.argv[1]).max_tokens
encode_captions(digit_captions(), n)
empty_caption_encoding(n)
PY
du -sh "$DEST"
if [ "${WHEELS:-0}" = 1 ]; then
  # the lent machines' image has torch, transformers, numpy, pyyaml, msgpack, psutil, ninja, einops...;
  # deepspeed ships as a source archive: built here into a pure-Python wheel (no ops compiled)
  mkdir -p .whl
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    megatron-core==0.16.1 diffusers==0.42.1 webdataset==1.0.2 braceexpand omegaconf==2.4.0 hjson==3.1.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection importlib_metadata zipp
  .venv/bin/pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
  du -sh .whl
fi
