#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
# On a GPU cluster set D2M_TORCH_SPEC to the build your site provides (e.g. "torch==2.13.0").
TORCH_SPEC=${D2M_TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.d2m-installed
want="$(sha1sum pyproject.toml | cut -c1-40) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
echo "$want" > "$stamp"
