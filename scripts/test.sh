#!/usr/bin/env bash
# Set everything up, then run the whole test suite against the installed wheel
# (Triton kernels in the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export PYACCEL_REQUIRE_INSTALLED=1
# the pytest script, not `python -m pytest`: -m would put the source tree first on sys.path
pytest -q -p no:cacheprovider tests "$@"
