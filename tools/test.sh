#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need, then runs pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh tests/models -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source launchers/env.sh
# style and layering first: seconds, and they name the file (tests/architecture runs them too)
.venv/bin/ruff check d2m_dist tests
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
