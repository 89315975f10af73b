#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need, then runs pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh tests/models -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source launchers/env.sh
exec .venv/bin/python -m pytest "$@"
